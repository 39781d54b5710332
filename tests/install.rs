//! deploy/install.sh into a DESTDIR lays out the expected tree, keeps an existing config, and uninstalls.

use std::path::Path;
use std::process::Command;

fn run(dest: &Path, args: &[&str]) -> std::process::Output {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_pmkvqd")).parent().unwrap();
    Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/install.sh"))
        .args(args)
        .env("DESTDIR", dest)
        .env("BIN_DIR", bin_dir)
        .output()
        .unwrap()
}

#[test]
fn install_into_destdir_then_uninstall() {
    let dest = tempfile::tempdir().unwrap();
    let d = dest.path();
    let out = run(d, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "usr/bin/pmkvqd",
        "usr/bin/pmkvq",
        "lib/systemd/system/pmkvqd.service",
        "etc/pmkvq/pmkvqd.toml",
        "etc/pmkvq/pmkvqd.env.example",
        "var/lib/pmkvq/profiles/default.profile.json",
    ] {
        assert!(d.join(f).is_file(), "{f} missing");
    }
    assert!(d.join("var/lib/pmkvq/models").is_dir());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.join("usr/bin/pmkvqd"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    let env_mode = std::fs::metadata(d.join("etc/pmkvq/pmkvqd.env.example"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(env_mode & 0o777, 0o600, "the env file may hold a token");
    // The installed config is the example (valid, every key).
    let cfg = std::fs::read_to_string(d.join("etc/pmkvq/pmkvqd.toml")).unwrap();
    assert!(cfg.contains("[memory]") && cfg.contains("listen = \"127.0.0.1:50051\""));

    // A second install keeps the operator's config.
    std::fs::write(d.join("etc/pmkvq/pmkvqd.toml"), "threads = 3\n").unwrap();
    assert!(run(d, &[]).status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("etc/pmkvq/pmkvqd.toml")).unwrap(),
        "threads = 3\n"
    );
    assert!(d.join("etc/pmkvq/pmkvqd.toml.new").is_file());

    // Uninstall removes binaries and unit, keeps config and state; --purge removes those too.
    assert!(run(d, &["--uninstall"]).status.success());
    assert!(!d.join("usr/bin/pmkvqd").exists() && !d.join("lib/systemd/system/pmkvqd.service").exists());
    assert!(d.join("etc/pmkvq/pmkvqd.toml").exists());
    assert!(run(d, &["--uninstall", "--purge"]).status.success());
    assert!(!d.join("etc/pmkvq").exists() && !d.join("var/lib/pmkvq").exists());
    assert_eq!(run(d, &["--bogus"]).status.code(), Some(64));
}
