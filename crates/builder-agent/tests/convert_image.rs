//! `builder-agent convert-image` against the real dockerd (started by `scripts/services.sh`):
//! the image is read from its overlay2 layer directories, and when a layer uses an overlayfs
//! feature a layer tar cannot express, the agent falls back to `docker save` and gets the same
//! bytes.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

fn docker() -> Command {
    let mut command = Command::new("/usr/bin/docker");
    command.env("DOCKER_HOST", env("DOCKER_HOST"));
    command
}

/// Runs `builder-agent convert-image IMAGE OUTPUT`; returns the JSON it prints and its stderr.
fn convert_image(image: &str, output: &Path, work: &Path) -> (serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_builder-agent"))
        .args(["convert-image", image])
        .arg(output)
        .arg("--work-dir")
        .arg(work)
        .env("DOCKER_HOST", env("DOCKER_HOST"))
        .env("BUILDER_INIT", env("BUILDER_INIT"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "convert-image failed: {stderr}");
    (serde_json::from_slice(&out.stdout).unwrap(), stderr)
}

#[test]
fn convert_image_reads_layer_dirs_and_falls_back_to_docker_save() {
    let scratch = tempfile::tempdir().unwrap();
    let context = scratch.path().join("context");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(
        context.join("Dockerfile"),
        format!(
            "FROM {}\nRUN mkdir -p /srv/www && echo hi > /srv/www/index.html && rm -rf /home\n\
             USER 1000\nENV A=1\nEXPOSE 8080 53/udp\nCMD [\"httpd\", \"-f\"]\n",
            env("BUILDER_TEST_BASE_IMAGE")
        ),
    )
    .unwrap();
    let tag = unique("convert-image");
    run(docker()
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &tag])
        .arg(&context));
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let direct = scratch.path().join("direct.ext4");
    let (report, log) = convert_image(&tag, &direct, &work);
    assert_eq!(report["route"], "layer-dirs", "{log}");
    assert!(
        log.contains("layer directories of the daemon's overlay2 store"),
        "{log}"
    );
    assert_eq!(report["config"]["User"], "1000");
    assert_eq!(report["config"]["Cmd"], serde_json::json!(["httpd", "-f"]));
    assert_eq!(
        report["config"]["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}})
    );

    // Mark a directory of the top layer as an overlayfs redirect: the agent must not read it
    // (a tar cannot say that) and take the image through docker save instead.
    let inspect = run(docker().args([
        "image",
        "inspect",
        "-f",
        "{{.GraphDriver.Data.UpperDir}}",
        &tag,
    ]));
    let marked = Path::new(inspect.trim()).join("srv");
    let path = std::ffi::CString::new(marked.as_os_str().as_encoded_bytes()).unwrap();
    let value = b"/elsewhere";
    // SAFETY: path and the name are NUL-terminated, value is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c"trusted.overlay.redirect".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    let saved = scratch.path().join("saved.ext4");
    let (fallback, log) = convert_image(&tag, &saved, &work);
    run(docker().args(["rmi", "-f", &tag]));
    assert_eq!(fallback["route"], "docker-save", "{log}");
    let reason = fallback["fallback_reason"].as_str().unwrap();
    assert!(
        reason.contains("trusted.overlay.redirect") && reason.contains("srv"),
        "{reason}"
    );
    assert!(log.contains("convert: using docker save"), "{log}");
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "the archive is left behind"
    );

    // Same image, same bytes, whichever way it came out of the daemon (config.json included).
    assert_eq!(report["image_id"], fallback["image_id"]);
    assert_eq!(report["config"], fallback["config"]);
    assert_eq!(report["sha256"], fallback["sha256"]);
    assert_eq!(
        sha256_hex(&std::fs::read(&direct).unwrap()),
        report["sha256"].as_str().unwrap()
    );
}
