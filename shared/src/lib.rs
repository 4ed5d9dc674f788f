//! Muster's shared vocabulary: the agent protocol spoken over wss, the HTTP API's request and
//! response types, and the validated newtypes both sides parse at their edges. Serde only, no I/O
//! (`secret` reads from a reader it is handed, and opens nothing).

pub mod api;
pub mod audit;
pub mod backoff;
pub mod duration;
pub mod id;
pub mod job;
pub mod labels;
pub mod protocol;
pub mod secret;
pub mod selector;
pub mod signing;
pub mod time;
pub mod whole;

pub use id::{AgentId, JobId, RunId};
pub use labels::Labels;
pub use selector::Selector;
pub use time::Timestamp;

/// The version every Muster binary of this build reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
