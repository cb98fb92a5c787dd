//! A BERT WordPiece tokenizer for the static embedder's hot path: the same normalisation
//! (clean text, CJK spacing, accent stripping, lowercasing), pre-tokenisation (whitespace
//! and punctuation) and greedy longest-match WordPiece as the `tokenizers` crate's
//! `BertNormalizer` + `BertPreTokenizer` + `WordPiece`, without its per-call allocations
//! and regex machinery. Tests pin it to the `tokenizers` crate token for token.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use unicode_categories::UnicodeCategories;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// FNV-1a: vocabulary keys are short, so a simple hash beats SipHash several times over.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let start = if self.0 == 0 { crate::rng::FNV_OFFSET } else { self.0 };
        self.0 = crate::rng::fnv1a(start, bytes);
    }
}

type FastMap = HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>;

const MAX_WORD_CHARS: usize = 100;

pub struct WordPiece {
    /// Pieces that start a word.
    starts: FastMap,
    /// Pieces that continue a word (`##` removed).
    continuations: FastMap,
    unknown: u32,
}

impl WordPiece {
    /// Builds from a token → id vocabulary (as in `tokenizer.json`), `[UNK]` required.
    #[must_use]
    pub fn new(vocab: &HashMap<String, u32>) -> Option<Self> {
        let mut starts = FastMap::default();
        let mut continuations = FastMap::default();
        for (token, id) in vocab {
            match token.strip_prefix("##") {
                Some(rest) => continuations.insert(rest.into(), *id),
                None => starts.insert(token.as_str().into(), *id),
            };
        }
        let unknown = *vocab.get("[UNK]")?;
        Some(Self {
            starts,
            continuations,
            unknown,
        })
    }

    /// Token ids of `text` without special tokens, appended to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let normalized = normalize(text);
        let mut word_start: Option<usize> = None;
        for (index, character) in normalized.char_indices() {
            if character.is_whitespace() {
                if let Some(start) = word_start.take() {
                    self.word(&normalized[start..index], out);
                }
            } else if is_punctuation(character) {
                if let Some(start) = word_start.take() {
                    self.word(&normalized[start..index], out);
                }
                self.word(&normalized[index..index + character.len_utf8()], out);
            } else if word_start.is_none() {
                word_start = Some(index);
            }
        }
        if let Some(start) = word_start {
            self.word(&normalized[start..], out);
        }
    }

    fn word(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > MAX_WORD_CHARS {
            out.push(self.unknown);
            return;
        }
        let before = out.len();
        let mut start = 0;
        while start < word.len() {
            let table = if start == 0 { &self.starts } else { &self.continuations };
            let mut end = word.len();
            let mut found = None;
            while end > start {
                if let Some(id) = table.get(&word[start..end]) {
                    found = Some(*id);
                    break;
                }
                end -= 1;
                while !word.is_char_boundary(end) {
                    end -= 1;
                }
            }
            let Some(id) = found else {
                out.truncate(before);
                out.push(self.unknown);
                return;
            };
            out.push(id);
            start = end;
        }
    }
}

fn is_punctuation(character: char) -> bool {
    character.is_ascii_punctuation() || character.is_punctuation()
}

fn is_chinese(character: char) -> bool {
    matches!(
        character as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// BERT's normalisation: drop NUL, U+FFFD and control characters (all of Unicode's
/// "other" category but tab, newline and carriage return — so also U+000B, U+000C and
/// U+0085, which Rust calls whitespace), whitespace to spaces,
/// spaces around CJK characters, NFD with combining marks removed, lowercase.
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    if text.is_ascii() {
        for byte in text.bytes() {
            match byte {
                b'\t' | b'\n' | b'\r' | b' ' => out.push(' '),
                // Vertical tab and form feed are whitespace to Rust but control characters
                // to BERT, whose cleaning drops them before it looks for whitespace.
                0..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F => {}
                _ => out.push(char::from(byte.to_ascii_lowercase())),
            }
        }
        return out;
    }
    let mut cleaned = String::with_capacity(text.len() + 8);
    for character in text.chars() {
        if character == '\0'
            || character == '\u{fffd}'
            || character.is_other() && !matches!(character, '\t' | '\n' | '\r')
        {
            continue;
        }
        if matches!(character, '\t' | '\n' | '\r') || character.is_whitespace() {
            cleaned.push(' ');
        } else if is_chinese(character) {
            cleaned.push(' ');
            cleaned.push(character);
            cleaned.push(' ');
        } else {
            cleaned.push(character);
        }
    }
    for character in cleaned
        .nfd()
        .filter(|c| !(is_combining_mark(*c) && c.is_mark_nonspacing()))
    {
        out.extend(character.to_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_longest_match_with_continuations_and_unknowns() {
        let vocab: HashMap<String, u32> = [
            ("[UNK]", 0),
            ("un", 1),
            ("##aff", 2),
            ("##able", 3),
            ("unaff", 4),
            ("!", 5),
        ]
        .into_iter()
        .map(|(token, id)| (token.to_owned(), id))
        .collect();
        let tokenizer = WordPiece::new(&vocab).unwrap();
        let mut ids = Vec::new();
        tokenizer.encode_into("UNAFFABLE! unxyz", &mut ids);
        assert_eq!(ids, vec![4, 3, 5, 0]);
    }
}
