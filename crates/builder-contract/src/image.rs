//! The image config a converted rootfs carries: what its init runs.
//!
//! Field names are those of the Docker/OCI image config (`config` object), so the JSON the
//! converter writes to `/.builder-vm/config.json` (and uploads beside the rootfs as
//! `<s3_key>.json`) reads like the image's own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub working_dir: String,
    #[serde(rename = "User", default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `"80/tcp": {}` as in the image config.
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
}

impl ImageConfig {
    /// The command line the image runs: `Entrypoint` followed by `Cmd`.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }

    /// The value of `name` in `Env`, if set.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env.iter().find_map(|kv| {
            kv.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_field_names_and_ignores_the_rest() {
        let config: ImageConfig = serde_json::from_str(
            r#"{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin","A=b=c"],
                "WorkingDir":"/app","User":"app:app","ExposedPorts":{"80/tcp":{}},"Labels":null}"#,
        )
        .unwrap();
        assert_eq!(config.argv(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(config.env_value("A"), Some("b=c"));
        assert_eq!(config.env_value("PAT"), None);
        assert!(config.exposed_ports.contains_key("80/tcp"));
        let round: ImageConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round, config);
    }
}
