//! The image config a converted rootfs carries: what its init runs.
//!
//! Field names are those of the `config` object of a Docker/OCI image config, so the JSON the
//! converter writes to `/.builder-vm/config.json` (and uploads beside the rootfs as
//! `<s3_key>.json`) reads like the image's own. Docker writes `null` for unset lists, so every
//! field is optional; the image config has more fields (Labels, Volumes, ...) that are ignored
//! on purpose.

use std::collections::BTreeMap;

/// Where the converter installs the init of an application microVM (`init=` on its cmdline).
pub const INIT_PATH: &str = "/.builder-vm/init";
/// Where the converter installs the image config that init reads.
pub const CONFIG_PATH: &str = "/.builder-vm/config.json";

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `"80/tcp": {}` as in the image config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
}

impl ImageConfig {
    /// The command line the image runs: `Entrypoint` followed by `Cmd`.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }

    /// The `Env` entries (`NAME=value`).
    pub fn env(&self) -> &[String] {
        self.env.as_deref().unwrap_or_default()
    }

    /// The value of `name` in `Env`, if set.
    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env().iter().find_map(|kv| {
            kv.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_field_names_nulls_and_ignores_the_rest() {
        let config: ImageConfig = serde_json::from_str(
            r#"{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["PATH=/bin","A=b=c"],
                "WorkingDir":"/app","User":"app:app","ExposedPorts":{"80/tcp":{}},"Labels":null}"#,
        )
        .unwrap();
        assert_eq!(config.argv(), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(config.env_value("A"), Some("b=c"));
        assert_eq!(config.env_value("PAT"), None);
        assert!(config
            .exposed_ports
            .as_ref()
            .unwrap()
            .contains_key("80/tcp"));
        let round: ImageConfig =
            serde_json::from_str(&serde_json::to_string(&config).unwrap()).unwrap();
        assert_eq!(round, config);
        let nulls: ImageConfig =
            serde_json::from_str(r#"{"Env":null,"Cmd":null,"Entrypoint":null}"#).unwrap();
        assert!(nulls.argv().is_empty() && nulls.env().is_empty());
    }
}
