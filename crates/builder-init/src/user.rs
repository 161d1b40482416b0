//! The image's `User`: `name`, `uid`, `name:group` or `uid:gid`, resolved against the image's
//! own `/etc/passwd` and `/etc/group` (a static binary has no NSS).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the primary group and every group listing the user.
    pub groups: Vec<u32>,
    pub home: String,
}

/// `name:x:uid:gid:gecos:home:shell` lines.
fn passwd_entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
}

pub fn resolve_user(
    spec: &str,
    passwd_path: &str,
    group_path: &str,
) -> Result<Credentials, String> {
    let passwd = std::fs::read_to_string(passwd_path).unwrap_or_default();
    let group = std::fs::read_to_string(group_path).unwrap_or_default();
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = passwd_entries(&passwd).find(|f| f[0] == user_part || f[2] == user_part);
    let uid: u32 = match (&entry, user_part.parse()) {
        (_, Ok(uid)) => uid,
        (Some(f), Err(_)) => f[2]
            .parse()
            .map_err(|_| format!("bad uid for `{user_part}` in /etc/passwd"))?,
        (None, Err(_)) => {
            return Err(format!(
                "the user `{user_part}` is not in the image's /etc/passwd"
            ))
        }
    };
    let name = entry.as_ref().map(|f| f[0]);
    let home = entry
        .as_ref()
        .and_then(|f| f.get(5))
        .filter(|h| !h.is_empty())
        .map_or("/".to_string(), |h| h.to_string());
    let groups_file: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    let gid: u32 = match group_part {
        Some(g) => match g.parse() {
            Ok(gid) => gid,
            Err(_) => groups_file
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("the group `{g}` is not in the image's /etc/group"))?,
        },
        None => entry.as_ref().and_then(|f| f[3].parse().ok()).unwrap_or(0),
    };
    let mut groups = vec![gid];
    if let (Some(name), None) = (name, group_part) {
        for f in &groups_file {
            let members = f.get(3).copied().unwrap_or_default();
            if members.split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse() {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_numbers_and_groups() {
        let dir = std::env::temp_dir().join(format!("init-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        let group = dir.join("group");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(&group, "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\n").unwrap();
        let (p, g) = (passwd.to_str().unwrap(), group.to_str().unwrap());
        let app = resolve_user("app", p, g).unwrap();
        assert_eq!(
            (app.uid, app.gid, app.groups.clone(), app.home.as_str()),
            (1000, 1000, vec![1000, 10], "/home/app")
        );
        assert_eq!(resolve_user("", p, g).unwrap().uid, 0);
        let numeric = resolve_user("4242:4343", p, g).unwrap();
        assert_eq!(
            (numeric.uid, numeric.gid, numeric.home.as_str()),
            (4242, 4343, "/")
        );
        assert_eq!(resolve_user("app:wheel", p, g).unwrap().gid, 10);
        assert!(resolve_user("ghost", p, g).unwrap_err().contains("`ghost`"));
        assert!(resolve_user("app:nogroup", p, g)
            .unwrap_err()
            .contains("`nogroup`"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
