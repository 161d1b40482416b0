//! Cache keys and their ids: a key is a namespace and a name; its id, the name of its
//! directory under `keys/`, is the first 32 hex digits of SHA-256 over both parts, each
//! prefixed by its length so that no two keys share an encoding.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::CacheError;

/// Hex digits in a [`CacheId`].
const ID_LEN: usize = 32;

/// The id of a cache key on disk and in the API: 32 lower-case hex digits of
/// SHA-256(namespace, name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct CacheId(String);

impl CacheId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for CacheId {
    type Err = CacheError;
    fn from_str(value: &str) -> Result<Self, CacheError> {
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if value.len() == ID_LEN && value.bytes().all(hex) {
            Ok(CacheId(value.to_owned()))
        } else {
            Err(CacheError::CacheIdSyntax {
                value: value.to_owned(),
            })
        }
    }
}

/// A cache key: builds share a cache only when both parts are equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    id: CacheId,
    namespace: String,
    name: String,
}

impl CacheKey {
    pub const MAX_NAME_LEN: usize = 256;

    /// A key of a non-empty `namespace` and a `name` of 1 to [`Self::MAX_NAME_LEN`] printable
    /// characters (no control characters).
    pub fn new(namespace: &str, name: &str) -> Result<Self, CacheError> {
        if namespace.is_empty() {
            return Err(CacheError::KeyNamespaceEmpty);
        }
        let chars = name.chars().count();
        if !(1..=Self::MAX_NAME_LEN).contains(&chars) || name.chars().any(char::is_control) {
            return Err(CacheError::KeyName {
                name: name.to_owned(),
                max: Self::MAX_NAME_LEN,
            });
        }
        let mut hash = Sha256::new();
        for part in [namespace, name] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        let mut id = hex::encode(hash.finalize());
        id.truncate(ID_LEN);
        Ok(CacheKey {
            id: CacheId(id),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
    pub fn id(&self) -> &CacheId {
        &self.id
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hash_both_parts_length_prefixed() {
        // SHA-256(le64(len) namespace le64(len) name), first 32 hex, computed independently
        // (Python's hashlib).
        let key = CacheKey::new("alice", "https://git.example/app.git").unwrap();
        assert_eq!(key.id().as_str(), "d3e76d812684dcca460a804039be8ca3");
        assert_eq!(key.namespace(), "alice");
        assert_eq!(key.name(), "https://git.example/app.git");
        let (a_bc, ab_c) = (
            CacheKey::new("a", "bc").unwrap(),
            CacheKey::new("ab", "c").unwrap(),
        );
        assert_eq!(a_bc.id().as_str(), "9a8acca1b6c6c0befd3fbc756aed625d");
        assert_eq!(ab_c.id().as_str(), "43ee655579de01ca739b3f95c1c2d3f4");
        assert_eq!(
            CacheKey::new("a", "bc").unwrap(),
            a_bc,
            "the same parts, the same key"
        );
    }

    #[test]
    fn names_and_namespaces_are_checked() {
        let longest = "é".repeat(CacheKey::MAX_NAME_LEN);
        assert!(CacheKey::new("ns", &longest).is_ok());
        for bad in [String::new(), format!("{longest}x"), "tab\there".into()] {
            let err = CacheKey::new("ns", &bad).unwrap_err();
            assert!(
                matches!(&err, CacheError::KeyName { name, max: 256 } if *name == bad),
                "{err:?}"
            );
        }
        assert!(matches!(
            CacheKey::new("", "name"),
            Err(CacheError::KeyNamespaceEmpty)
        ));
    }

    #[test]
    fn ids_parse_from_exactly_32_lower_case_hex() {
        let key = CacheKey::new("ns", "name").unwrap();
        assert_eq!(&key.id().as_str().parse::<CacheId>().unwrap(), key.id());
        for bad in [
            "",
            "D3E76D812684DCCA460A804039BE8CA3",
            "d3e76d812684dcca460a804039be8ca",
            "d3e76d812684dcca460a804039be8ca30",
            "g3e76d812684dcca460a804039be8ca3",
            "../76d812684dcca460a804039be8ca3",
        ] {
            let err = bad.parse::<CacheId>().unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("`{bad}` is not a cache id: use 32 lower-case hex digits")
            );
        }
    }
}
