//! Reading server-sent events: frames end at a blank line; `id:` and `data:` fields matter.

/// One event as received.
pub struct Frame {
    pub id: Option<String>,
    pub data: String,
}

/// Takes every complete frame out of `buf`, leaving a partial one for the next read.
pub fn take_frames(buf: &mut Vec<u8>) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(end) = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2) {
        let raw: Vec<u8> = buf.drain(..end).collect();
        let text = String::from_utf8_lossy(&raw);
        let id = text.lines().find_map(|l| l.strip_prefix("id:")).map(|s| s.trim().to_owned());
        let data = text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect::<Vec<_>>().join("\n");
        if !data.is_empty() {
            frames.push(Frame { id, data });
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_at_blank_lines_and_keep_their_id() {
        let mut buf = b": keep-alive\n\nid: 7-1\nevent: x\ndata: {\"a\":1}\n\nid: 7-2\ndata: {\"b\"".to_vec();
        let frames = take_frames(&mut buf);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].id.as_deref(), Some("7-1"));
        assert_eq!(frames[0].data, "{\"a\":1}");
        assert_eq!(buf, b"id: 7-2\ndata: {\"b\"");
    }
}
