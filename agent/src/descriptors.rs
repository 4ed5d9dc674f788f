//! Descriptors the agent inherited from whoever started it. systemd passes only stdin, stdout
//! and stderr, but a shell or a supervisor may leak more, and `Command` hands every descriptor
//! without close-on-exec to the commands the agent runs. The agent's own descriptors are all
//! opened close-on-exec by std and tokio; this marks the inherited ones the same way, once, at
//! start.
//!
//! **Boundary:** the only `unsafe` in the workspace, one line, explained below.

use std::os::fd::BorrowedFd;

/// Marks every descriptor above stderr close-on-exec. Returns how many were marked. Call it
/// first in `main`, before any other thread or descriptor exists.
#[allow(unsafe_code)]
pub fn close_inherited_on_exec() -> usize {
    let listed: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).filter(|fd| *fd > 2).collect(),
        Err(_) => return 0,
    };
    let mut marked = 0;
    for fd in listed {
        // SAFETY: this runs before the agent opens anything or starts a thread, so each number
        // listed is either a descriptor inherited at exec (open, and used by nothing in this
        // process) or the one `read_dir` used, already closed: fcntl then fails with EBADF and
        // nothing else happens. The borrow lasts for this one call.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if rustix::io::fcntl_setfd(borrowed, rustix::io::FdFlags::CLOEXEC).is_ok() {
            marked += 1;
        }
    }
    marked
}
