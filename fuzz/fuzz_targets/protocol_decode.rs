//! The agent protocol decoder, as the gateway (agent messages) and the agent (server messages)
//! call it on every text frame. Any bytes are made text (lossily, as a frame that is not UTF-8
//! never reaches `decode`, but its replacement-character form is still text someone could send).
//!
//! Checks: `decode` never panics; a decoded message serializes, carries its own `type`, and
//! decodes again to an equal value; `validate` never panics, and what the server derives from a
//! valid heartbeat never panics; any heartbeat the agent sanitizes validates, and sanitizing
//! twice is sanitizing once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::protocol::{AgentMessage, DecodeError, Heartbeat, ServerMessage};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(msg) = round_trip(&text, AgentMessage::decode, AgentMessage::type_name) {
        // What the gateway does next: validate; only a valid message reaches the recorder.
        let valid = msg.validate();
        if let Err(e) = &valid {
            let _ = e.to_string();
        }
        match &msg {
            AgentMessage::Heartbeat(h) => {
                if valid.is_ok() {
                    let _ = h.metrics.disk_totals();
                }
                // What the agent does before sending: after sanitize, validate must pass, and a
                // second sanitize changes nothing.
                let mut m = h.metrics.clone();
                m.sanitize();
                let sanitized = AgentMessage::Heartbeat(Heartbeat { seq: h.seq, metrics: m.clone() });
                assert_eq!(sanitized.validate(), Ok(()), "sanitized {sanitized:?}");
                let _ = m.disk_totals();
                let mut again = m.clone();
                again.sanitize();
                assert_eq!(again, m, "sanitize is not idempotent");
            }
            AgentMessage::Hello(h) => {
                let _ = h.labels.to_string();
            }
            _ => {}
        }
    }
    if let Some(ServerMessage::Welcome(w)) = round_trip(&text, ServerMessage::decode, ServerMessage::type_name) {
        let _ = w.labels.to_string();
    }
});

fn round_trip<T>(text: &str, decode: fn(&str) -> Result<T, DecodeError>, type_name: fn(&T) -> &'static str) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let msg = match decode(text) {
        Ok(msg) => msg,
        Err(e) => {
            let _ = (e.close_code(), e.to_string());
            return None;
        }
    };
    let json = serde_json::to_string(&msg).unwrap_or_else(|e| panic!("{msg:?} decoded but does not serialize: {e}"));
    let value: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} is not JSON: {e}"));
    assert_eq!(value.get("type").and_then(|t| t.as_str()), Some(type_name(&msg)), "{json}");
    let again = decode(&json).unwrap_or_else(|e| panic!("{json} (from {text:?}) does not decode: {e}"));
    assert_eq!(again, msg, "{json} decodes to something else");
    Some(msg)
}
