//! The packages: what `packaging/build.sh` puts in each .deb and in the tarball, unpacked the
//! way dpkg would. Packaged from the dev binaries `cargo test` built (the contents do not
//! depend on the profile).

// Helpers below are test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn find(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix)))
        .unwrap_or_else(|| panic!("no {prefix}*{suffix} in {}", dir.display()))
}

fn unit_in(root: &Path, name: &str) -> PathBuf {
    ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| root.join(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not in the package"))
}

/// The packaged server is built without the local development agent: the agent's executor and
/// installer are not in the binary that runs on the server.
#[test]
fn the_packaged_server_does_not_link_the_agent() {
    let ws = workspace();
    let script = std::fs::read_to_string(ws.join("packaging/build.sh")).unwrap();
    assert!(script.contains("-p server --no-default-features"), "build.sh builds the server without dev-agent");
    let tree = |features: &[&str]| {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["tree", "--offline", "-p", "server", "-e", "normal", "--prefix", "none"]).args(features).current_dir(&ws);
        run(&mut cmd)
    };
    let links_agent = |tree: &str| tree.lines().any(|l| l.starts_with("agent v"));
    assert!(!links_agent(&tree(&["--no-default-features"])), "the packaged server's dependencies include the agent");
    assert!(links_agent(&tree(&[])), "the default build (cargo run -- --dev) has its local agent");
}

#[test]
fn the_debs_and_the_tarball_contain_what_a_terminal_and_a_server_need() {
    let ws = workspace();
    // Package the binaries `cargo test` built: building here would replace them under the
    // feet of the other tests running them.
    run(Command::new("bash").arg("packaging/build.sh").env("PROFILE", "dev").env("NO_BUILD", "1").current_dir(&ws));
    // The target directory this test runs from (it may not be ./target).
    let exe = std::env::current_exe().unwrap();
    let out = exe.parent().and_then(Path::parent).and_then(Path::parent).unwrap().join("package");

    // The agent: its binary and unit; nothing of an agent's state, so an upgrade keeps it.
    let agent_deb = find(&out, "muster-agent_", ".deb");
    let agent = tempfile::tempdir().unwrap();
    run(Command::new("dpkg").arg("-x").arg(&agent_deb).arg(agent.path()));
    let bin = agent.path().join("usr/bin/muster-agent");
    assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
    assert!(std::fs::read_to_string(unit_in(agent.path(), "muster-agent.service")).unwrap().contains("ExecStart=/usr/bin/muster-agent"));
    assert!(!agent.path().join("var/lib/muster-agent").exists() && !agent.path().join("etc/muster/agent.toml").exists());
    run(Command::new(&bin).arg("--version"));
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&agent_deb));
    assert!(info.contains("Package: muster-agent"), "{info}");

    // The server: both binaries, its unit, its config as a conffile, and its system user.
    let server_deb = find(&out, "muster-server_", ".deb");
    let server = tempfile::tempdir().unwrap();
    run(Command::new("dpkg").arg("-x").arg(&server_deb).arg(server.path()));
    for file in ["usr/bin/muster-server", "usr/bin/muster"] {
        assert_eq!(std::fs::metadata(server.path().join(file)).unwrap().permissions().mode() & 0o777, 0o755, "{file}");
    }
    let unit = std::fs::read_to_string(unit_in(server.path(), "muster-server.service")).unwrap();
    assert!(unit.contains("User=muster") && unit.contains("ProtectSystem=strict") && unit.contains("NoNewPrivileges=yes"), "{unit}");
    assert!(std::fs::read_to_string(server.path().join("etc/muster/server.toml")).unwrap().contains("data_dir = \"/var/lib/muster\""));
    assert!(std::fs::read_to_string(server.path().join("usr/lib/sysusers.d/muster.conf")).unwrap().contains("u muster"));
    let control = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb").arg("--control").arg(&server_deb).arg(control.path()));
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert!(conffiles.contains("/etc/muster/server.toml"), "{conffiles}");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers") && postinst.contains("muster-server.service"), "{postinst}");

    // The tarball, for other distributions.
    let tarball = find(&out, "muster-", ".tar.gz");
    let listing = run(Command::new("tar").arg("tzf").arg(&tarball));
    for want in ["bin/muster-agent", "bin/muster-server", "bin/muster", "systemd/muster-agent.service", "systemd/muster-server.service"] {
        assert!(listing.lines().any(|l| l.ends_with(want)), "{want} not in the tarball:\n{listing}");
    }
}
