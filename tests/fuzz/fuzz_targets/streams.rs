//! Upstream answers and prompts: the usage scanner and the stream-end check give the same
//! result however a stream is cut into chunks, prompt features are finite, and thresholds
//! parsed from model names lie in [0, 1].
#![no_main]
use libfuzzer_sys::fuzz_target;
use routellm::{features, model_name, prompts, request::Api, sse::StreamEnd, usage};

fuzz_target!(|data: &[u8]| {
    let _ = usage::of_body(data);
    if let Some((&cut, body)) = data.split_first() {
        let cut = usize::from(cut).min(body.len());
        let mut whole = usage::SseUsageScanner::default();
        let found_whole = whole.feed(body);
        let mut split = usage::SseUsageScanner::default();
        let found_split = split.feed(&body[..cut]).or_else(|| split.feed(&body[cut..]));
        assert_eq!(format!("{found_whole:?}"), format!("{found_split:?}"));
        for api in [Api::ChatCompletions, Api::Responses, Api::Completions] {
            let mut whole = StreamEnd::new(api);
            whole.feed(body);
            let mut split = StreamEnd::new(api);
            split.feed(&body[..cut]);
            split.feed(&body[cut..]);
            assert_eq!(whole.ended(), split.ended());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let values = features::extract(text);
        assert!(values.iter().all(|value| value.is_finite()), "{values:?}");
        if let Ok(model_name::ModelTarget::Routed {
            threshold: Some(threshold),
            ..
        }) = model_name::parse(text)
        {
            assert!((0.0..=1.0).contains(&threshold));
        }
        // A chat entry's turns end with the turn `parse` reads (an earlier malformed turn
        // may fail the whole file where the last turn alone does not).
        if let (Ok(last), Ok(turns)) = (prompts::parse(text), prompts::parse_turns(text, 8)) {
            assert_eq!(last.len(), turns.len());
            for (prompt, entry) in last.iter().zip(&turns) {
                assert!((1..=8).contains(&entry.len()));
                assert_eq!(entry.last(), Some(prompt));
            }
        }
    }
});
