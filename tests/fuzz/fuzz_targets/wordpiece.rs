//! Differential: the static embedder's own WordPiece tokenizer against the `tokenizers`
//! crate on the same vocabulary, token for token.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use routellm::embed::wordpiece::WordPiece;
use tokenizers::Tokenizer;

fn pair() -> &'static (Tokenizer, WordPiece) {
    static PAIR: OnceLock<(Tokenizer, WordPiece)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../routers/static/tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(path).expect("the shipped tokenizer");
        tokenizer.with_truncation(None).expect("no truncation");
        tokenizer.with_padding(None);
        let ours = WordPiece::new(&tokenizer.get_vocab(false)).expect("our tokenizer");
        (tokenizer, ours)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (reference, ours) = pair();
    let expected = reference.encode(text, false).expect("encode").get_ids().to_vec();
    let mut got = Vec::new();
    ours.encode_into(text, &mut got);
    assert_eq!(got, expected, "text {text:?}");
});
