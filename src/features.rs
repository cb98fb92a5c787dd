//! Hand-made prompt features that carry difficulty signal an embedding misses: length,
//! structure, and markers of code, maths and multiple choice. Used beside the embedding
//! by the trained routers; the same code computes them in training and at serving time.

/// Names of the features, in vector order (recorded in router manifests).
pub const NAMES: [&str; 12] = [
    "log_chars",
    "log_words",
    "log_lines",
    "digit_share",
    "symbol_share",
    "upper_share",
    "question_marks",
    "code_markers",
    "math_markers",
    "choice_options",
    "mean_word_length",
    "log_longest_line",
];

/// The feature vector of `prompt`.
#[must_use]
pub fn extract(prompt: &str) -> [f32; NAMES.len()] {
    let mut chars = 0_usize;
    let mut digits = 0_usize;
    let mut symbols = 0_usize;
    let mut uppers = 0_usize;
    let mut questions = 0_usize;
    for character in prompt.chars() {
        chars += 1;
        if character.is_ascii_digit() {
            digits += 1;
        } else if character.is_uppercase() {
            uppers += 1;
        } else if "+-*/=^<>{}[]()_\\|&%$#@~;:".contains(character) {
            symbols += 1;
        }
        if character == '?' {
            questions += 1;
        }
    }
    let words = prompt.split_whitespace().count();
    let lines: Vec<&str> = prompt.lines().collect();
    let longest_line = lines.iter().map(|line| line.chars().count()).max().unwrap_or(0);
    let code_markers = [
        "```", "def ", "return ", "import ", "function", "class ", "#include", "=>", "();", "{\n", "print(",
    ]
    .iter()
    .filter(|marker| prompt.contains(*marker))
    .count();
    let lowercase = prompt.to_lowercase();
    let math_markers = [
        "\\frac",
        "\\sqrt",
        "^",
        "=",
        "solve",
        "calculate",
        "compute",
        "integral",
        "probability",
        "equation",
    ]
    .iter()
    .filter(|marker| lowercase.contains(*marker))
    .count();
    let choice_options = lines
        .iter()
        .filter(|line| {
            let line = line.trim_start();
            let bytes = line.as_bytes();
            bytes.len() >= 2
                && (bytes[0].is_ascii_uppercase() && (bytes[1] == b'.' || bytes[1] == b')')
                    || bytes[0] == b'(' && bytes.len() >= 3 && bytes[1].is_ascii_uppercase() && bytes[2] == b')')
        })
        .count();
    #[allow(clippy::cast_precision_loss)]
    let share = |count: usize| if chars == 0 { 0.0 } else { count as f32 / chars as f32 };
    #[allow(clippy::cast_precision_loss)]
    let log = |count: usize| (count as f32).ln_1p();
    #[allow(clippy::cast_precision_loss)]
    let mean_word_length = if words == 0 { 0.0 } else { chars as f32 / words as f32 };
    [
        log(chars),
        log(words),
        log(lines.len()),
        share(digits),
        share(symbols),
        share(uppers),
        log(questions),
        log(code_markers),
        log(math_markers),
        log(choice_options),
        mean_word_length.min(20.0),
        log(longest_line),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_reflect_length_code_maths_and_choices() {
        let short = extract("hi");
        let long = extract(&"word ".repeat(400));
        assert!(long[0] > short[0] && long[1] > short[1]);
        let code = extract("```python\ndef f(x):\n    return x\n```");
        assert!(code[7] > 0.0);
        let maths = extract("Solve x^2 = 4 and compute the integral");
        assert!(maths[8] > 0.0);
        let choices = extract("Which is right?\nA. one\nB. two\n(C) three");
        assert!((choices[9] - 3.0_f32.ln_1p()).abs() < 1e-6);
        assert_eq!(extract("").len(), NAMES.len());
        assert!(extract("").iter().all(|value| value.is_finite()));
    }
}
