//! `scripts/build-image.sh`: the docker-archive built without Docker or a registry is the image the
//! Dockerfile describes. Its config (user, entrypoint, command, ports, environment) is compared with
//! the Dockerfile's runtime stage, its layer holds the binary, every library the binary links, the
//! CA certificates and the passwd entry of uid 65532, the same inputs give the same archive, and
//! (as root) the binary starts inside the extracted root filesystem with nothing from the host.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The runtime stage of the Dockerfile: its USER, EXPOSE, ENV, ENTRYPOINT and CMD.
#[derive(Debug, Default)]
struct Stage {
    user: String,
    ports: BTreeSet<String>,
    env: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn dockerfile_runtime_stage() -> Stage {
    let text = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let mut stage = Stage::default();
    let mut in_last = false;
    let last_from = text.lines().rfind(|l| l.starts_with("FROM ")).expect("a FROM line").to_owned();
    for line in text.lines() {
        if line.starts_with("FROM ") {
            in_last = line == last_from;
            continue;
        }
        if !in_last {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "USER" => stage.user = rest.trim().to_owned(),
            "EXPOSE" => stage.ports.extend(rest.split_whitespace().map(|p| {
                if p.contains('/') {
                    p.to_owned()
                } else {
                    format!("{p}/tcp")
                }
            })),
            "ENV" => {
                let (k, v) = rest.trim().split_once('=').expect("ENV K=V");
                stage.env.push((k.to_owned(), v.to_owned()));
            }
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(rest).expect("ENTRYPOINT in exec form"),
            "CMD" => stage.cmd = serde_json::from_str(rest).expect("CMD in exec form"),
            _ => {}
        }
    }
    assert!(!stage.user.is_empty() && !stage.entrypoint.is_empty(), "runtime stage parsed: {stage:?}");
    stage
}

fn build(out: &Path) {
    let status = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/build-image.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_pod-template-webhook"), "--output"])
        .arg(out)
        .status()
        .expect("run scripts/build-image.sh");
    assert!(status.success(), "scripts/build-image.sh failed");
}

fn untar(archive: &Path, into: &Path) {
    std::fs::create_dir_all(into).unwrap();
    let status = Command::new("tar").arg("-xf").arg(archive).arg("-C").arg(into).status().unwrap();
    assert!(status.success(), "tar -xf {}", archive.display());
}

fn chart_image_reference() -> String {
    let chart = std::fs::read_to_string(Path::new(ROOT).join("charts/pod-template-webhook/Chart.yaml")).unwrap();
    let app_version =
        chart.lines().find_map(|l| l.strip_prefix("appVersion:")).unwrap().trim().trim_matches('"').to_owned();
    let values = std::fs::read_to_string(Path::new(ROOT).join("charts/pod-template-webhook/values.yaml")).unwrap();
    let repo = values.lines().find_map(|l| l.strip_prefix("  repository:")).unwrap().trim().to_owned();
    format!("{repo}:{app_version}")
}

#[test]
fn the_archive_is_the_dockerfile_image() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar");
    build(&archive);
    let again = dir.path().join("again.tar");
    build(&again);
    assert_eq!(std::fs::read(&archive).unwrap(), std::fs::read(&again).unwrap(), "same inputs, same archive");

    let x = dir.path().join("x");
    untar(&archive, &x);
    let manifest: Value = serde_json::from_slice(&std::fs::read(x.join("manifest.json")).unwrap()).unwrap();
    let entry = &manifest[0];
    assert_eq!(entry["RepoTags"][0], chart_image_reference(), "tagged as the chart's default image");
    let config: Value =
        serde_json::from_slice(&std::fs::read(x.join(entry["Config"].as_str().unwrap())).unwrap()).unwrap();
    let layers = entry["Layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!((config["os"].as_str(), config["architecture"].as_str()), (Some("linux"), Some("amd64")));

    // The same user, entrypoint, command, ports and environment as the Dockerfile.
    let stage = dockerfile_runtime_stage();
    let c = &config["config"];
    assert_eq!(c["User"], stage.user.as_str(), "USER");
    assert_eq!(c["Entrypoint"], serde_json::json!(stage.entrypoint), "ENTRYPOINT");
    assert_eq!(c["Cmd"], serde_json::json!(stage.cmd), "CMD");
    let ports: BTreeSet<String> = c["ExposedPorts"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(ports, stage.ports, "EXPOSE");
    let env: Vec<String> = c["Env"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
    for (k, v) in &stage.env {
        assert!(env.contains(&format!("{k}={v}")), "ENV {k}={v} in {env:?}");
    }
    // What the distroless base image sets.
    assert!(env.iter().any(|e| e.starts_with("PATH=")), "{env:?}");
    assert!(env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".to_owned()), "{env:?}");

    // The layer, and its digest in the config.
    let layer = x.join(layers[0].as_str().unwrap());
    let digest = sha256_hex(&layer);
    assert_eq!(config["rootfs"]["diff_ids"][0], format!("sha256:{digest}"));
    let rootfs = dir.path().join("rootfs");
    untar(&layer, &rootfs);
    let binary = rootfs.join(stage.entrypoint[0].trim_start_matches('/'));
    assert!(binary.is_file(), "the entrypoint exists in the image");
    for lib in linked_libraries(Path::new(env!("CARGO_BIN_EXE_pod-template-webhook"))) {
        assert!(rootfs.join(lib.strip_prefix("/").unwrap()).is_file(), "{} is in the image", lib.display());
    }
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    let uid = stage.user.split(':').next().unwrap();
    assert!(passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)), "a passwd entry for uid {uid}: {passwd}");
    let listing = Command::new("tar").args(["-tvf"]).arg(&layer).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.lines().filter(|l| !l.contains("home/nonroot")).all(|l| l.contains(" 0/0 ")),
        "root-owned files:\n{listing}"
    );
    assert!(
        listing.lines().any(|l| l.contains("65532/65532") && l.contains("home/nonroot")),
        "the nonroot home:\n{listing}"
    );

    // Nothing from the host: the binary runs inside the image's root filesystem (needs root for
    // chroot; CI runs as root).
    // SAFETY: geteuid takes nothing, cannot fail and touches no memory of ours.
    if unsafe { libc::geteuid() } == 0 {
        let out = Command::new("/usr/sbin/chroot")
            .arg(&rootfs)
            .args([&stage.entrypoint[0], "--version"])
            .env_clear()
            .output()
            .expect("chroot");
        assert!(out.status.success(), "the binary starts in the image: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    } else {
        eprintln!("not root: the chroot start check is skipped");
    }
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

/// The absolute library paths `ldd` lists for `binary`.
fn linked_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().expect("ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    let libs: Vec<PathBuf> =
        text.lines().filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/'))).map(PathBuf::from).collect();
    assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "ldd lists libc: {text}");
    libs
}
