//! HTTP Basic credentials: `base64(user:password)`, as git's `Authorization` header and a
//! Docker config's `auth` carry a token or a registry login. The log must hide this form too.

use base64::Engine;

/// `base64(user:password)`.
pub fn encode(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}
