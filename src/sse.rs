//! Server-sent events read as they pass through, without parsing or holding the stream:
//! lines split across network chunks with a bounded buffer ([`LineSplitter`]), and whether
//! an upstream stream reached its final event ([`StreamEnd`]).
//!
//! Why the end matters: an upstream that closes its stream cleanly but early (a server
//! that catches its own failure and returns, a close-delimited HTTP/1.0 body) looks to
//! the transport like a finished answer. Clients would take the partial answer as whole;
//! the proxy knows each API's final event and says so instead.

use crate::request::Api;

/// A line longer than this is not buffered whole: the events the proxy looks for are a few
/// hundred bytes, and holding arbitrarily long lines would make memory follow the upstream.
pub(crate) const MAX_LINE_BYTES: usize = 64 * 1024;

/// Splits a byte stream into lines (without their `\n`) whatever its chunk boundaries,
/// holding at most `MAX_LINE_BYTES` (64 KiB) of a partial line: a longer line is passed on cut to
/// its first `MAX_LINE_BYTES`, the same however it was chunked. Why the start: an
/// event's `type` comes first, and a Responses stream's `response.completed` line carries
/// the whole answer, so can be longer than any buffer the proxy should hold.
#[derive(Default)]
pub struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// Feeds the next bytes; calls `each_line` for every line they complete.
    pub fn feed(&mut self, mut bytes: &[u8], mut each_line: impl FnMut(&[u8])) {
        while let Some(end) = bytes.iter().position(|&byte| byte == b'\n') {
            if self.line.is_empty() {
                each_line(&bytes[..end.min(MAX_LINE_BYTES)]);
            } else {
                self.hold(&bytes[..end]);
                each_line(&self.line);
                self.line.clear();
            }
            bytes = &bytes[end + 1..];
        }
        self.hold(bytes);
    }

    fn hold(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES - self.line.len();
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// Watches a stream's `data:` lines, whatever its chunk boundaries, for the first payload
/// a caller's `pick` finds something in (usage, a response id), counting them as it goes.
#[derive(Default)]
pub struct DataScanner {
    lines: LineSplitter,
    data_events: u64,
}

impl DataScanner {
    /// Feeds the next bytes; returns what `pick` found in the first `data:` payload it
    /// accepts among the lines these bytes complete.
    pub fn feed<T>(&mut self, bytes: &[u8], mut pick: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
        let mut found = None;
        let mut data_events = 0;
        self.lines.feed(bytes, |line| {
            let Some(payload) = data_of_line(line) else {
                return;
            };
            data_events += 1;
            if found.is_none() {
                found = pick(payload);
            }
        });
        self.data_events += data_events;
        found
    }

    /// The `data:` events seen so far.
    #[must_use]
    pub fn data_events(&self) -> u64 {
        self.data_events
    }
}

/// The payload of a `data:` line, without a trailing `\r`.
#[must_use]
pub fn data_of_line(line: &[u8]) -> Option<&[u8]> {
    line.strip_suffix(b"\r").unwrap_or(line).strip_prefix(b"data:")
}

/// The text after each occurrence of the JSON key `"key"` and its colon, at any depth,
/// without leading whitespace: enough to tell a value's kind or compare a short string
/// without parsing every event of a stream (this runs on every line of every stream).
pub fn values_of<'a>(json: &'a [u8], key: &str) -> impl Iterator<Item = &'a [u8]> {
    let finder = memchr::memmem::Finder::new(key.as_bytes());
    let mut rest = json;
    std::iter::from_fn(move || {
        loop {
            let at = finder.find(rest)?;
            let quoted = at > 0 && rest[at - 1] == b'"' && rest.get(at + key.len()) == Some(&b'"');
            rest = &rest[at + key.len()..];
            if !quoted {
                continue;
            }
            // A key is followed by a colon; the same text as a value (`"type":"usage"`) is not.
            if let Some(value) = rest[1..].trim_ascii_start().strip_prefix(b":") {
                return Some(value.trim_ascii_start());
            }
        }
    })
}

/// Whether an upstream stream has sent the event that ends it: `data: [DONE]`, a choice's
/// `finish_reason` or an `error` object for Chat Completions; `response.completed`,
/// `response.failed`, `response.incomplete` or `error` for the Responses API.
pub struct StreamEnd {
    api: Api,
    lines: LineSplitter,
    ended: bool,
}

impl StreamEnd {
    #[must_use]
    pub fn new(api: Api) -> Self {
        Self {
            api,
            lines: LineSplitter::default(),
            ended: false,
        }
    }

    /// Watches the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.ended {
            return;
        }
        let api = self.api;
        let mut ended = false;
        self.lines.feed(bytes, |line| ended = ended || is_final(api, line));
        self.ended = ended;
    }

    /// Whether the final event has passed.
    #[must_use]
    pub fn ended(&self) -> bool {
        self.ended
    }
}

const RESPONSES_FINAL_EVENTS: [&[u8]; 4] = [
    b"response.completed",
    b"response.failed",
    b"response.incomplete",
    b"error",
];

fn is_final(api: Api, line: &[u8]) -> bool {
    match api {
        Api::ChatCompletions | Api::Completions => data_of_line(line).is_some_and(|data| {
            data.trim_ascii() == b"[DONE]"
                // `"finish_reason":null` until a choice ends; a string once it has.
                || values_of(data, "finish_reason").any(|value| value.starts_with(b"\""))
                || values_of(data, "error").any(|value| value.starts_with(b"{"))
        }),
        Api::Responses => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(name) = line.strip_prefix(b"event:") {
                return RESPONSES_FINAL_EVENTS.contains(&name.trim_ascii());
            }
            data_of_line(line).is_some_and(|data| {
                values_of(data, "type")
                    .filter_map(string_value)
                    .any(|name| RESPONSES_FINAL_EVENTS.contains(&name))
            })
        }
    }
}

/// The text of a JSON string value up to its closing quote (an escaped quote ends it early,
/// which no event name has).
fn string_value(value: &[u8]) -> Option<&[u8]> {
    let text = value.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', text)?;
    Some(&text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(api: Api, stream: &str) -> bool {
        let mut end = StreamEnd::new(api);
        end.feed(stream.as_bytes());
        end.ended()
    }

    #[test]
    fn lines_are_whole_at_every_split() {
        let stream = b"data: a\n\ndata: bc\r\n: comment\nlast";
        for split in 0..=stream.len() {
            let mut splitter = LineSplitter::default();
            let mut lines = Vec::new();
            let (head, tail) = stream.split_at(split);
            splitter.feed(head, |line| lines.push(line.to_vec()));
            splitter.feed(tail, |line| lines.push(line.to_vec()));
            assert_eq!(
                lines,
                [&b"data: a"[..], b"", b"data: bc\r", b": comment"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn an_overlong_line_is_cut_to_its_start_however_it_is_chunked() {
        let mut stream = b"data: {\"type\":\"response.completed\",\"text\":\"".to_vec();
        stream.extend(std::iter::repeat_n(b'x', 2 * MAX_LINE_BYTES));
        stream.extend_from_slice(b"\"}\ndata: next\n");
        for split in [0, 10, MAX_LINE_BYTES - 1, MAX_LINE_BYTES + 7, stream.len() - 3] {
            let mut splitter = LineSplitter::default();
            let mut lines = Vec::new();
            let (head, tail) = stream.split_at(split);
            splitter.feed(head, |line| lines.push(line.to_vec()));
            assert!(
                splitter.line.capacity() <= MAX_LINE_BYTES,
                "the long line was held whole"
            );
            splitter.feed(tail, |line| lines.push(line.to_vec()));
            assert_eq!(lines.len(), 2, "split at {split}");
            assert_eq!(lines[0], stream[..MAX_LINE_BYTES], "split at {split}");
            assert_eq!(lines[1], b"data: next", "split at {split}");
        }
    }

    #[test]
    fn values_are_found_after_keys_not_after_equal_values() {
        let json = br#"{"type": "usage", "usage" : {"a":1}, "nested":{"usage":null}}"#;
        let values: Vec<&[u8]> = values_of(json, "usage").collect();
        assert_eq!(values.len(), 2);
        assert!(values[0].starts_with(b"{\"a\""));
        assert!(values[1].starts_with(b"null"));
    }

    #[test]
    fn chat_streams_end_with_done_a_finish_reason_or_an_error() {
        let content = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"said \\\"finish_reason\\\": \\\"stop\\\"\"},\"finish_reason\":null}]}\n\n";
        assert!(!ended(Api::ChatCompletions, content));
        assert!(ended(Api::ChatCompletions, &format!("{content}data: [DONE]\n\n")));
        assert!(ended(Api::ChatCompletions, &format!("{content}data:[DONE]\r\n")));
        assert!(ended(
            Api::ChatCompletions,
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\": \"stop\"}]}\n\n"
        ));
        assert!(ended(
            Api::ChatCompletions,
            "data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\"}}\n\n"
        ));
        assert!(!ended(
            Api::ChatCompletions,
            "data: {\"error\":null,\"choices\":[]}\n\n"
        ));
        // Not yet a whole line.
        assert!(!ended(Api::ChatCompletions, "data: [DONE]"));
    }

    #[test]
    fn responses_streams_end_with_a_final_event() {
        let delta = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"the \\\"type\\\":\\\"response.completed\\\" event\"}\n\n";
        assert!(!ended(Api::Responses, delta));
        assert!(!ended(
            Api::Responses,
            "event: response.completed_soon\ndata: {\"type\":\"response.completed_soon\"}\n\n"
        ));
        // A long answer makes a long final line; its start says what it is.
        let long = format!(
            "data: {{\"type\":\"response.completed\",\"response\":{{\"text\":\"{}\"}}}}\n\n",
            "x".repeat(3 * MAX_LINE_BYTES)
        );
        let mut end = StreamEnd::new(Api::Responses);
        for piece in long.as_bytes().chunks(1000) {
            end.feed(piece);
        }
        assert!(end.ended());
        for name in ["response.completed", "response.failed", "response.incomplete", "error"] {
            assert!(
                ended(Api::Responses, &format!("{delta}event: {name}\ndata: {{}}\n\n")),
                "{name}"
            );
            // Providers that send only `data:` lines.
            assert!(
                ended(
                    Api::Responses,
                    &format!("{delta}data: {{\"type\": \"{name}\",\"x\":1}}\n\n")
                ),
                "{name}"
            );
        }
    }
}
