//! Token usage read off the answers as they pass through, for the per-tier token counters
//! in `/metrics`: what share of tokens (and so of spend) the strong model takes is the
//! number a routing deployment is judged by, and request counts alone hide it (one long
//! answer costs more than many short ones).
//!
//! Nothing is added to the request to obtain it: a non-streamed answer carries `usage`
//! anyway, and so does a Responses stream (in its `response.completed` event); a Chat
//! Completions stream carries it only when the client asked
//! (`stream_options.include_usage`), and the proxy does not ask on the client's behalf.

use serde::Deserialize;

/// Tokens one answer reports (the Responses API calls them input and output tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<Usage>,
    /// A Responses stream reports usage inside the `response` of its `response.completed` event.
    response: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    usage: Option<Usage>,
}

/// The usage of a complete (non-streamed) answer or of one stream event, if it reports one.
#[must_use]
pub fn of_body(body: &[u8]) -> Option<Usage> {
    let envelope = serde_json::from_slice::<Envelope>(body).ok()?;
    envelope.usage.or_else(|| envelope.response?.usage)
}

/// Watches a stream of server-sent events for the chunk that carries `usage`, whatever
/// the network's chunk boundaries, holding at most one bounded line at a time.
#[derive(Default)]
pub struct SseUsageScanner {
    data: crate::sse::DataScanner,
}

impl SseUsageScanner {
    /// Feeds the next bytes of the stream; returns the usage once a complete event line
    /// reporting one has passed.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<Usage> {
        self.data.feed(bytes, usage_of_event)
    }

    /// The `data:` events seen so far: about a token each in a stream that reports no usage.
    #[must_use]
    pub fn data_events(&self) -> u64 {
        self.data.data_events()
    }
}

fn usage_of_event(payload: &[u8]) -> Option<Usage> {
    // Most events carry no usage or `"usage":null`; only parse one that has an object.
    if crate::sse::values_of(payload, "usage").any(|value| value.starts_with(b"{")) {
        return of_body(payload);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const USAGE_EVENT: &str = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}\n\n";

    fn stream_with_usage() -> String {
        let content =
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        format!("{content}{content}{USAGE_EVENT}data: [DONE]\n\n")
    }

    #[test]
    fn a_complete_answer_reports_its_usage() {
        let body = br#"{"id":"c","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":6,"total_tokens":14}}"#;
        assert_eq!(
            of_body(body),
            Some(Usage {
                prompt_tokens: 8,
                completion_tokens: 6
            })
        );
        assert_eq!(of_body(br#"{"id":"c","choices":[]}"#), None);
        assert_eq!(of_body(br#"{"id":"c","usage":null}"#), None);
        assert_eq!(of_body(b"not json"), None);
    }

    #[test]
    fn the_usage_event_is_found_at_every_split_of_the_stream() {
        let stream = stream_with_usage();
        let expected = Usage {
            prompt_tokens: 12,
            completion_tokens: 34,
        };
        for split in 0..=stream.len() {
            let mut scanner = SseUsageScanner::default();
            let (head, tail) = stream.as_bytes().split_at(split);
            let found = [scanner.feed(head), scanner.feed(tail)];
            assert_eq!(
                found.iter().flatten().collect::<Vec<_>>(),
                vec![&expected],
                "split at {split}"
            );
        }
        let mut scanner = SseUsageScanner::default();
        let byte_by_byte: Vec<Usage> = stream.bytes().filter_map(|byte| scanner.feed(&[byte])).collect();
        assert_eq!(byte_by_byte, vec![expected]);
    }

    #[test]
    fn streams_without_usage_and_crlf_lines_are_handled() {
        let mut scanner = SseUsageScanner::default();
        assert_eq!(
            scanner.feed(b"data: {\"choices\":[],\"usage\":null}\n\ndata: [DONE]\n\n"),
            None
        );
        let crlf = USAGE_EVENT.replace('\n', "\r\n");
        assert_eq!(
            SseUsageScanner::default()
                .feed(crlf.as_bytes())
                .map(|usage| usage.completion_tokens),
            Some(34)
        );
    }

    #[test]
    fn an_overlong_line_is_not_mistaken_for_usage() {
        let mut scanner = SseUsageScanner::default();
        let long = format!("data: {{\"text\":\"{}\"", "x".repeat(crate::sse::MAX_LINE_BYTES));
        assert_eq!(scanner.feed(long.as_bytes()), None);
        // The rest of the long line is ignored; the next line is read normally.
        assert_eq!(scanner.feed(b",\"usage\":{\"prompt_tokens\":1}}\n"), None);
        assert_eq!(
            scanner.feed(USAGE_EVENT.as_bytes()).map(|usage| usage.prompt_tokens),
            Some(12)
        );
    }

    #[test]
    fn responses_usage_is_read_from_answers_and_the_completed_event() {
        let body =
            br#"{"id":"resp_1","object":"response","usage":{"input_tokens":9,"output_tokens":4,"total_tokens":13}}"#;
        let expected = Usage {
            prompt_tokens: 9,
            completion_tokens: 4,
        };
        assert_eq!(of_body(body), Some(expected));
        let stream = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"the \\\"usage\\\": {\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"tools\":[{\"usage\":1}],\"usage\":{\"input_tokens\":9,\"output_tokens\":4,\"total_tokens\":13}}}\n\n",
        );
        let mut scanner = SseUsageScanner::default();
        assert_eq!(scanner.feed(stream.as_bytes()), Some(expected));
    }
}
