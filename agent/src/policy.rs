//! The agent's own rules for what it will run, from `[policy]` and `run_as` in agent.toml. The
//! server cannot change them: a compromised server, or a stolen operator token, gets only what
//! the terminal's owner allowed here.
//!
//! [`Policy::launch`] turns a run's command into exactly what will be executed, or refuses it
//! with the rule that refused it. A refused run never starts a process.
//!
//! **Invariant:** with `commands = "listed"`, the program executed is the canonical absolute
//! path that was matched (no PATH lookup after the check; symlinks already resolved), and
//! `argv[0]` as the program sees it is what the job sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use shared::job::{CommandSpec, Program};

/// PATH for commands when the agent's own environment is not passed on.
pub const CLEAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `[policy]` as written in agent.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// `"any"` (the default without programs or prefixes) or `"listed"`.
    pub commands: Option<String>,
    #[serde(default)]
    pub programs: Vec<PathBuf>,
    #[serde(default)]
    pub argv_prefixes: Vec<Vec<String>>,
    /// `sh -c` scripts. Default: allowed with `commands = "any"`, refused with `"listed"`.
    pub shell: Option<bool>,
    /// Runs may only use these directories (or below) as their working directory.
    pub working_dirs: Option<Vec<PathBuf>>,
    /// `"pass"` or `"scrub"` for the variables a job sets. Default: pass with `"any"`,
    /// scrub with `"listed"`.
    pub env: Option<String>,
    /// Job variables passed even when `env = "scrub"`.
    #[serde(default)]
    pub env_allow: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commands {
    Any,
    Listed { programs: BTreeSet<PathBuf>, argv_prefixes: Vec<Vec<String>> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvRule {
    Pass,
    Scrub,
}

/// The user and group commands run as, resolved when the config is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub group: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub commands: Commands,
    pub shell: bool,
    pub working_dirs: Option<Vec<PathBuf>>,
    pub env: EnvRule,
    pub env_allow: BTreeSet<String>,
    pub run_as: Option<RunAs>,
}

impl Default for Policy {
    /// Today's behaviour: anything, as the agent's user, in the agent's environment.
    fn default() -> Policy {
        Policy { commands: Commands::Any, shell: true, working_dirs: None, env: EnvRule::Pass, env_allow: BTreeSet::new(), run_as: None }
    }
}

/// Why a run was refused: the rule's name (as in agent.toml) and what it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub rule: &'static str,
    pub detail: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused by the agent's policy ({}): {}", self.rule, self.detail)
    }
}

/// Exactly what to execute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub program: PathBuf,
    /// What the program sees as `argv[0]`.
    pub arg0: String,
    pub args: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// The complete environment when `clean`; otherwise added to the agent's own.
    pub env: BTreeMap<String, String>,
    pub clean: bool,
    pub ids: Option<(u32, u32)>,
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

impl Policy {
    /// Builds the policy from the file's `[policy]` and `run_as`, checking it hangs together.
    pub fn from_file(file: Option<PolicyFile>, run_as: Option<&str>) -> Result<Policy, String> {
        let file = file.unwrap_or_default();
        let listed_given = !file.programs.is_empty() || !file.argv_prefixes.is_empty();
        let commands = match file.commands.as_deref() {
            None if listed_given => "listed",
            None => "any",
            Some(c) => c,
        };
        let commands = match commands {
            "any" if listed_given => return Err("policy: programs and argv_prefixes have no effect with commands = \"any\"".into()),
            "any" => Commands::Any,
            "listed" => {
                let mut programs = BTreeSet::new();
                for p in &file.programs {
                    if !p.is_absolute() {
                        return Err(format!("policy.programs: {} must be an absolute path", p.display()));
                    }
                    programs.insert(canonical(p));
                }
                let mut argv_prefixes = Vec::new();
                for prefix in &file.argv_prefixes {
                    let Some(first) = prefix.first() else {
                        return Err("policy.argv_prefixes: an empty prefix would allow everything".into());
                    };
                    if !Path::new(first).is_absolute() {
                        return Err(format!("policy.argv_prefixes: {first} must be an absolute path"));
                    }
                    let mut p = prefix.clone();
                    p[0] = canonical(Path::new(first)).to_string_lossy().into_owned();
                    argv_prefixes.push(p);
                }
                Commands::Listed { programs, argv_prefixes }
            }
            other => return Err(format!("policy.commands: {other:?} is neither \"any\" nor \"listed\"")),
        };
        let listed = commands != Commands::Any;
        let env = match file.env.as_deref() {
            None if listed => EnvRule::Scrub,
            None | Some("pass") => EnvRule::Pass,
            Some("scrub") => EnvRule::Scrub,
            Some(other) => return Err(format!("policy.env: {other:?} is neither \"pass\" nor \"scrub\"")),
        };
        let working_dirs = match file.working_dirs {
            Some(dirs) if dirs.is_empty() => {
                return Err("policy.working_dirs: an empty list allows no run at all; leave it out instead".into());
            }
            Some(dirs) => {
                let mut out = Vec::new();
                for d in dirs {
                    if !d.is_absolute() {
                        return Err(format!("policy.working_dirs: {} must be an absolute path", d.display()));
                    }
                    out.push(canonical(&d));
                }
                Some(out)
            }
            None => None,
        };
        let run_as = run_as.map(resolve_run_as).transpose()?;
        Ok(Policy {
            commands,
            shell: file.shell.unwrap_or(!listed),
            working_dirs,
            env,
            env_allow: file.env_allow.into_iter().collect(),
            run_as,
        })
    }

    /// Checks a run's command against every rule; on success, what exactly to execute.
    /// `agent_path` is the agent's own PATH, used to find a bare program name when the
    /// agent's environment is passed on.
    pub fn launch(&self, command: &CommandSpec, agent_path: Option<&str>) -> Result<Launch, Refusal> {
        let clean = self.run_as.is_some() || self.env == EnvRule::Scrub;
        let cwd = self.working_dir(command.cwd.as_deref())?;
        let (program, arg0, args) = match &command.program {
            Program::Shell(script) => {
                if !self.shell {
                    return Err(Refusal { rule: "shell", detail: "shell scripts are not allowed on this agent; send argv instead".into() });
                }
                (PathBuf::from("/bin/sh"), "sh".to_owned(), vec!["-c".to_owned(), script.clone()])
            }
            Program::Argv(argv) => {
                let Some(first) = argv.first() else {
                    return Err(Refusal { rule: "commands", detail: "an empty argv".into() });
                };
                match &self.commands {
                    // Today's behaviour exactly: the OS finds the program.
                    Commands::Any => (PathBuf::from(first), first.clone(), argv[1..].to_vec()),
                    Commands::Listed { programs, argv_prefixes } => {
                        let path = if clean { Some(CLEAN_PATH) } else { agent_path };
                        let exe = resolve(first, cwd.as_deref(), path).ok_or_else(|| Refusal {
                            rule: "commands",
                            detail: format!("{first:?} is not an executable file on this agent"),
                        })?;
                        let exe_str = exe.to_string_lossy();
                        let allowed = programs.contains(&exe)
                            || argv_prefixes
                                .iter()
                                .any(|p| p[0] == exe_str && argv.len() >= p.len() && p[1..].iter().zip(&argv[1..]).all(|(a, b)| a == b));
                        if !allowed {
                            let shown: Vec<&str> = argv.iter().take(4).map(String::as_str).collect();
                            return Err(Refusal {
                                rule: "programs",
                                detail: format!("{} ({}) is not an allowed program or argv prefix", exe.display(), shown.join(" ")),
                            });
                        }
                        (exe, first.clone(), argv[1..].to_vec())
                    }
                }
            }
        };
        let mut env = BTreeMap::new();
        if clean {
            env.insert("PATH".to_owned(), CLEAN_PATH.to_owned());
            if let Some(u) = &self.run_as {
                env.insert("HOME".to_owned(), u.home.to_string_lossy().into_owned());
                env.insert("USER".to_owned(), u.user.clone());
                env.insert("LOGNAME".to_owned(), u.user.clone());
                env.insert("SHELL".to_owned(), u.shell.to_string_lossy().into_owned());
            }
            env.insert("LANG".to_owned(), "C.UTF-8".to_owned());
        }
        for (k, v) in &command.env {
            if self.env == EnvRule::Pass || self.env_allow.contains(k) {
                env.insert(k.clone(), v.clone());
            }
        }
        Ok(Launch { program, arg0, args, cwd, env, clean, ids: self.run_as.as_ref().map(|u| (u.uid, u.gid)) })
    }

    /// Job variables this policy drops from a command.
    pub fn scrubbed<'a>(&self, command: &'a CommandSpec) -> Vec<&'a str> {
        match self.env {
            EnvRule::Pass => Vec::new(),
            EnvRule::Scrub => command.env.keys().filter(|k| !self.env_allow.contains(*k)).map(String::as_str).collect(),
        }
    }

    fn working_dir(&self, asked: Option<&str>) -> Result<Option<PathBuf>, Refusal> {
        let Some(allowed) = &self.working_dirs else {
            return Ok(asked.map(PathBuf::from));
        };
        let Some(asked) = asked else {
            // No directory asked for: the first allowed one.
            return Ok(allowed.first().cloned());
        };
        let dir = std::fs::canonicalize(asked)
            .map_err(|e| Refusal { rule: "working_dirs", detail: format!("working directory {asked:?}: {e}") })?;
        if allowed.iter().any(|a| dir.starts_with(a)) {
            Ok(Some(dir))
        } else {
            Err(Refusal { rule: "working_dirs", detail: format!("{} is not inside an allowed working directory", dir.display()) })
        }
    }

    /// The effective policy, one line per rule, for `muster-agent check`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        match &self.commands {
            Commands::Any => out.push("policy commands: any command (no [policy] list)".to_owned()),
            Commands::Listed { programs, argv_prefixes } => {
                out.push(format!("policy commands: only {} listed programs and {} argv prefixes", programs.len(), argv_prefixes.len()));
                for p in programs {
                    let missing = if p.is_file() { "" } else { " (missing on this machine)" };
                    out.push(format!("  program {}{missing}", p.display()));
                }
                for p in argv_prefixes {
                    out.push(format!("  argv prefix {}", serde_json::to_string(p).unwrap_or_default()));
                }
            }
        }
        out.push(format!("policy shell: {}", if self.shell { "sh -c scripts allowed" } else { "sh -c scripts refused" }));
        match &self.working_dirs {
            None => out.push("policy working_dirs: any".to_owned()),
            Some(d) => {
                out.push(format!("policy working_dirs: {}", d.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")))
            }
        }
        match self.env {
            EnvRule::Pass => out.push("policy env: a job's variables are passed".to_owned()),
            EnvRule::Scrub => {
                let allow: Vec<&str> = self.env_allow.iter().map(String::as_str).collect();
                out.push(format!("policy env: a job's variables are dropped except [{}]", allow.join(", ")));
            }
        }
        match &self.run_as {
            None => out.push("run_as: the agent's own user, with the agent's environment".to_owned()),
            Some(u) => out.push(format!("run_as: {} ({}) group {} ({}), clean environment", u.user, u.uid, u.group, u.gid)),
        }
        for w in self.warnings() {
            out.push(format!("warning: {w}"));
        }
        out
    }

    /// Combinations that quietly allow everything.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Commands::Listed { programs, argv_prefixes } = &self.commands {
            if self.shell {
                out.push("shell = true with a program list: any script runs, so the list restricts nothing".to_owned());
            }
            if self.env == EnvRule::Pass {
                out.push("env = \"pass\" with a program list: a job can set LD_PRELOAD and run anything".to_owned());
            }
            let firsts =
                programs.iter().map(|p| p.as_path()).chain(argv_prefixes.iter().filter(|p| p.len() == 1).map(|p| Path::new(&p[0])));
            for p in firsts {
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if is_escape_hatch(&name) {
                    out.push(format!("{} runs other programs: allowing it with any arguments allows everything", p.display()));
                }
            }
        }
        out
    }
}

/// Programs that run whatever they are given: shells, interpreters, privilege tools.
fn is_escape_hatch(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "sh",
        "bash",
        "dash",
        "zsh",
        "ksh",
        "fish",
        "busybox",
        "env",
        "sudo",
        "doas",
        "su",
        "runuser",
        "setpriv",
        "nohup",
        "nice",
        "timeout",
        "xargs",
        "find",
        "awk",
        "gawk",
        "mawk",
        "perl",
        "ruby",
        "node",
        "nodejs",
        "lua",
        "php",
        "tclsh",
        "expect",
        "ssh",
        "systemd-run",
        "chroot",
        "nsenter",
        "unshare",
        "strace",
        "gdb",
        "vim",
        "vi",
        "less",
        "more",
        "tar",
        "rsync",
        "git",
    ];
    NAMES.contains(&name) || name.starts_with("python") || name.starts_with("perl")
}

/// The canonical absolute path of `argv[0]`: as given if it has a slash (relative to the
/// run's directory), else the first executable file of that name in `path`.
fn resolve(first: &str, cwd: Option<&Path>, path: Option<&str>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| std::fs::metadata(p).ok().filter(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).is_some();
    let candidate = if first.contains('/') {
        let p = Path::new(first);
        let p = if p.is_absolute() { p.to_owned() } else { cwd?.join(p) };
        executable(&p).then_some(p)?
    } else {
        path?.split(':').filter(|d| d.starts_with('/')).map(|d| Path::new(d).join(first)).find(|p| executable(p))?
    };
    std::fs::canonicalize(candidate).ok()
}

/// `user` or `user:group`, looked up in the system's user database.
fn resolve_run_as(spec: &str) -> Result<RunAs, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let pw = nix::unistd::User::from_name(user)
        .map_err(|e| format!("run_as: cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| format!("run_as: no user {user:?} on this machine"))?;
    let (group, gid) = match group {
        Some(g) => {
            let gr = nix::unistd::Group::from_name(g)
                .map_err(|e| format!("run_as: cannot look up group {g:?}: {e}"))?
                .ok_or_else(|| format!("run_as: no group {g:?} on this machine"))?;
            (gr.name, gr.gid.as_raw())
        }
        None => {
            let name = nix::unistd::Group::from_gid(pw.gid).ok().flatten().map(|g| g.name).unwrap_or_else(|| pw.gid.to_string());
            (name, pw.gid.as_raw())
        }
    };
    if pw.uid.is_root() {
        return Err("run_as: root is what run_as is for avoiding; leave run_as out to run as the agent's user".into());
    }
    let me = rustix::process::geteuid();
    if !me.is_root() && me.as_raw() != pw.uid.as_raw() {
        return Err(format!("run_as: the agent must run as root to run commands as {user}"));
    }
    Ok(RunAs { user: pw.name, group, uid: pw.uid.as_raw(), gid, home: pw.dir, shell: pw.shell })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(toml_text: &str) -> Policy {
        let file: PolicyFile = toml::from_str(toml_text).unwrap();
        Policy::from_file(Some(file), None).unwrap()
    }

    fn argv(a: &[&str]) -> CommandSpec {
        CommandSpec {
            program: Program::Argv(a.iter().map(|s| (*s).to_owned()).collect()),
            cwd: None,
            env: BTreeMap::new(),
            secret_env: Default::default(),
        }
    }

    #[test]
    fn without_a_policy_anything_runs_as_today() {
        let p = Policy::from_file(None, None).unwrap();
        assert_eq!(p, Policy::default());
        let l = p.launch(&argv(&["frobnicate", "-x"]), Some("/usr/bin")).unwrap();
        assert_eq!(l.program, PathBuf::from("frobnicate"));
        assert!(!l.clean);
        let shell = CommandSpec {
            program: Program::Shell("echo hi".into()),
            cwd: Some("/nonexistent".into()),
            env: BTreeMap::new(),
            secret_env: Default::default(),
        };
        assert!(p.launch(&shell, None).is_ok());
    }

    #[test]
    fn a_listed_program_runs_by_its_canonical_path_and_others_are_refused() {
        let p = listed("programs = [\"/bin/true\"]");
        let l = p.launch(&argv(&["true", "anything"]), Some("/nonexistent")).unwrap();
        assert_eq!(l.program, std::fs::canonicalize("/bin/true").unwrap());
        assert_eq!(l.arg0, "true");
        assert_eq!(l.args, ["anything"]);
        let e = p.launch(&argv(&["/bin/false"]), None).unwrap_err();
        assert_eq!(e.rule, "programs");
        assert!(e.to_string().contains("false"), "{e}");
        let e = p.launch(&argv(&["no-such-program-here"]), None).unwrap_err();
        assert_eq!(e.rule, "commands");
    }

    #[test]
    fn a_symlink_or_relative_path_to_a_listed_program_is_the_same_program() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("t");
        std::os::unix::fs::symlink(std::fs::canonicalize("/bin/true").unwrap(), &link).unwrap();
        let p = listed("programs = [\"/bin/true\"]");
        let spec = CommandSpec {
            program: Program::Argv(vec!["./t".into()]),
            cwd: Some(dir.path().to_string_lossy().into()),
            env: BTreeMap::new(),
            secret_env: Default::default(),
        };
        assert_eq!(p.launch(&spec, None).unwrap().program, std::fs::canonicalize("/bin/true").unwrap());
    }

    #[test]
    fn argv_prefixes_compare_element_by_element() {
        let p = listed("argv_prefixes = [[\"/bin/echo\", \"status\"]]");
        assert!(p.launch(&argv(&["/bin/echo", "status", "nginx"]), None).is_ok());
        assert!(p.launch(&argv(&["/bin/echo", "status"]), None).is_ok());
        for bad in [&["/bin/echo"][..], &["/bin/echo", "statusx"], &["/bin/echo", "restart", "status"], &["/bin/echo", "stat", "us"]] {
            assert_eq!(p.launch(&argv(bad), None).unwrap_err().rule, "programs", "{bad:?}");
        }
    }

    #[test]
    fn shell_scripts_are_refused_with_a_list_unless_allowed() {
        let script = CommandSpec { program: Program::Shell("id".into()), cwd: None, env: BTreeMap::new(), secret_env: Default::default() };
        assert_eq!(listed("programs = [\"/bin/true\"]").launch(&script, None).unwrap_err().rule, "shell");
        let p = listed("programs = [\"/bin/true\"]\nshell = true");
        assert_eq!(p.launch(&script, None).unwrap().program, PathBuf::from("/bin/sh"));
        assert!(p.warnings().iter().any(|w| w.contains("restricts nothing")));
        assert_eq!(listed("commands = \"any\"\nshell = false").launch(&script, None).unwrap_err().rule, "shell");
    }

    #[test]
    fn working_dirs_allow_only_their_own_trees() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("app");
        std::fs::create_dir(&inside).unwrap();
        let p = listed(&format!("commands = \"any\"\nworking_dirs = [{:?}]", dir.path()));
        let mut spec = argv(&["true"]);
        spec.cwd = Some(inside.to_string_lossy().into());
        assert_eq!(p.launch(&spec, None).unwrap().cwd, Some(std::fs::canonicalize(&inside).unwrap()));
        spec.cwd = Some(format!("{}/../..", inside.display()));
        assert_eq!(p.launch(&spec, None).unwrap_err().rule, "working_dirs");
        spec.cwd = Some("/etc".into());
        assert_eq!(p.launch(&spec, None).unwrap_err().rule, "working_dirs");
        spec.cwd = None;
        assert_eq!(p.launch(&spec, None).unwrap().cwd, Some(std::fs::canonicalize(dir.path()).unwrap()));
    }

    #[test]
    fn scrubbing_drops_job_variables_except_allowed_ones_and_cleans_the_environment() {
        let p = listed("programs = [\"/bin/true\"]\nenv_allow = [\"LANG\"]");
        let mut spec = argv(&["/bin/true"]);
        spec.env = BTreeMap::from([("LD_PRELOAD".into(), "/tmp/x.so".into()), ("LANG".into(), "fr_FR.UTF-8".into())]);
        let l = p.launch(&spec, None).unwrap();
        assert!(l.clean);
        assert_eq!(l.env.get("LANG").map(String::as_str), Some("fr_FR.UTF-8"));
        assert!(!l.env.contains_key("LD_PRELOAD"));
        assert_eq!(l.env.get("PATH").map(String::as_str), Some(CLEAN_PATH));
        assert_eq!(p.scrubbed(&spec), ["LD_PRELOAD"]);
        let pass = listed("programs = [\"/bin/true\"]\nenv = \"pass\"");
        assert!(pass.launch(&spec, None).unwrap().env.contains_key("LD_PRELOAD"));
        assert!(pass.warnings().iter().any(|w| w.contains("LD_PRELOAD")));
    }

    #[test]
    fn a_policy_that_does_not_hang_together_is_a_config_error() {
        for (text, want) in [
            ("commands = \"any\"\nprograms = [\"/bin/true\"]", "no effect"),
            ("commands = \"some\"", "neither"),
            ("programs = [\"true\"]", "absolute"),
            ("argv_prefixes = [[]]", "allow everything"),
            ("working_dirs = []", "allows no run"),
            ("env = \"maybe\"", "neither"),
        ] {
            let file: PolicyFile = toml::from_str(text).unwrap();
            let err = Policy::from_file(Some(file), None).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
        assert!(Policy::from_file(None, Some("no-such-user-here")).unwrap_err().contains("no user"));
        assert!(Policy::from_file(None, Some("root")).is_err());
    }

    #[test]
    fn allowing_an_interpreter_is_flagged() {
        let p = listed("programs = [\"/usr/bin/env\"]");
        assert!(p.warnings().iter().any(|w| w.contains("allows everything")), "{:?}", p.warnings());
    }
}
