-- Portable SQL, like 0001. A build that carries credentials (build secrets, a git token,
-- registry logins) keeps only their names here, as JSON (`CredentialNames`); the values are in
-- a file on the node that accepted it, and only that node may claim it (`pinned_node`).
ALTER TABLE builds ADD COLUMN credentials TEXT;
ALTER TABLE builds ADD COLUMN pinned_node TEXT;
