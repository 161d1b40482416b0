//! `.dockerignore`: which files of the checkout are left out of the build context.
//!
//! Follows the Docker CLI's semantics: one pattern a line, `#` comments, `!` re-includes,
//! patterns are cleaned paths relative to the context root (a leading `/` is dropped), `*` and `?`
//! do not cross `/`, `**` matches any number of directories, and the last matching pattern wins.
//! A pattern that matches a directory also matches everything under it.

use regex::Regex;

#[derive(Debug)]
struct Pattern {
    regex: Regex,
    /// Number of path components in the pattern, for matching a parent directory.
    depth: usize,
    exclusion: bool,
}

/// The parsed `.dockerignore`.
#[derive(Debug, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
}

/// A `.dockerignore` line that is not a valid pattern.
#[derive(Debug, thiserror::Error)]
#[error(".dockerignore line {line}: `{pattern}` is not a valid pattern")]
pub struct PatternError {
    pub line: usize,
    pub pattern: String,
    #[source]
    pub source: regex::Error,
}

impl DockerIgnore {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let mut patterns = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exclusion, body) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            let cleaned = clean(body);
            if cleaned.is_empty() {
                continue;
            }
            let regex = Regex::new(&to_regex(&cleaned)).map_err(|source| PatternError {
                line: index + 1,
                pattern: raw.to_string(),
                source,
            })?;
            patterns.push(Pattern {
                regex,
                depth: cleaned.split('/').count(),
                exclusion,
            });
        }
        Ok(DockerIgnore { patterns })
    }

    /// Whether any pattern re-includes files (then an excluded directory must still be walked).
    pub fn has_exclusions(&self) -> bool {
        self.patterns.iter().any(|p| p.exclusion)
    }

    /// Whether `path` (relative, `/`-separated) is left out of the context.
    pub fn is_ignored(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').collect();
        let mut ignored = false;
        for pattern in &self.patterns {
            let mut matched = pattern.regex.is_match(path);
            if !matched && parts.len() > 1 && pattern.depth < parts.len() {
                matched = pattern.regex.is_match(&parts[..pattern.depth].join("/"));
            }
            if matched {
                ignored = !pattern.exclusion;
            }
        }
        ignored
    }
}

/// Go's `filepath.Clean` for a relative pattern, with any leading `/` removed.
fn clean(pattern: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in pattern.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !pattern.starts_with('/') {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    parts.join("/")
}

/// A glob pattern as an anchored regular expression.
fn to_regex(pattern: &str) -> String {
    let mut re = String::from("^");
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                if chars.peek() == Some(&'/') {
                    chars.next();
                }
                if chars.peek().is_none() {
                    re.push_str(".*");
                } else {
                    re.push_str("(.*/)?");
                }
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '\\' => match chars.next() {
                Some(escaped) => re.push_str(&regex::escape(&escaped.to_string())),
                None => re.push_str("\\\\"),
            },
            '[' | ']' | '-' | '^' => re.push(c),
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    re
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_docker_semantics() {
        let ignore = DockerIgnore::parse(
            "# comment\n\n*.log\n/secrets\nnode_modules\n**/*.tmp\ndocs/**\n!docs/keep.md\nbuild/*/out\n",
        )
        .unwrap();
        for ignored in [
            "a.log",
            "secrets",
            "secrets/key",
            "node_modules/x/y.js",
            "x.tmp",
            "deep/er/x.tmp",
            "docs/a.md",
            "build/x/out",
            "build/x/out/file",
        ] {
            assert!(ignore.is_ignored(ignored), "{ignored} should be ignored");
        }
        for kept in [
            "sub/a.log",
            "docs/keep.md",
            "src/main.rs",
            "build/x/y/out",
            "Dockerfile",
        ] {
            assert!(!ignore.is_ignored(kept), "{kept} should be kept");
        }
        assert!(ignore.has_exclusions());
    }

    #[test]
    fn character_classes_and_question_marks() {
        let ignore = DockerIgnore::parse("file[0-9].txt\n?.md\n").unwrap();
        assert!(ignore.is_ignored("file3.txt"));
        assert!(!ignore.is_ignored("filex.txt"));
        assert!(ignore.is_ignored("a.md"));
        assert!(!ignore.is_ignored("ab.md"));
    }
}
