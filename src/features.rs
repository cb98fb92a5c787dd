//! Hand-made prompt features that carry difficulty signal an embedding misses: length,
//! structure, and markers of code, maths and multiple choice. Used beside the embedding
//! by the trained routers; the same code computes them in training and at serving time.
//!
//! Length is measured on the question a prompt finally asks (without answer options and
//! few-shot examples) as well as on the whole prompt: in the training data the two carry
//! difficulty signal of opposite sign (MMLU-Pro: question length alone ranks the
//! strong-vs-weak gap at APGR 0.55, whole-prompt length at 0.46), and mf's validation APGR
//! rose with them (MMLU-Pro 0.574 → 0.590).

/// Names of the features, in vector order (recorded in router manifests).
pub const NAMES: [&str; 14] = [
    "log_question_words",
    "log_words",
    "log_question_lines",
    "digit_share",
    "symbol_share",
    "upper_share",
    "question_marks",
    "code_markers",
    "math_markers",
    "choice_options",
    "mean_word_length",
    "log_longest_line",
    "log_question_chars",
    "log_question_numbers",
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
    let choice_options = lines.iter().filter(|line| is_option_line(line)).count();
    let question = question_stem(prompt);
    #[allow(clippy::cast_precision_loss)]
    let share = |count: usize| if chars == 0 { 0.0 } else { count as f32 / chars as f32 };
    #[allow(clippy::cast_precision_loss)]
    let log = |count: usize| (count as f32).ln_1p();
    #[allow(clippy::cast_precision_loss)]
    let mean_word_length = if words == 0 { 0.0 } else { chars as f32 / words as f32 };
    [
        log(question.iter().map(|line| line.split_whitespace().count()).sum()),
        log(words),
        log(question.len()),
        share(digits),
        share(symbols),
        share(uppers),
        log(questions),
        log(code_markers),
        log(math_markers),
        log(choice_options),
        mean_word_length.min(20.0),
        log(longest_line),
        log(question.iter().map(|line| line.chars().count() + 1).sum()),
        log(question.iter().map(|line| count_numbers(line)).sum()),
    ]
}

/// A multiple-choice option: `A. …`, `B) …`, `(C) …`.
fn is_option_line(line: &str) -> bool {
    let bytes = line.trim_start().as_bytes();
    bytes.len() >= 2
        && (bytes[0].is_ascii_uppercase() && (bytes[1] == b'.' || bytes[1] == b')')
            || bytes[0] == b'(' && bytes.len() >= 3 && bytes[1].is_ascii_uppercase() && bytes[2] == b')')
}

/// The lines of the question a prompt finally asks, without its answer options: after the
/// last answered few-shot example (`Answer: X` then a blank line), if any. Why: in the
/// training data, longer question stems and more quantities mean the weak model falls
/// behind, while longer options and few-shot prefixes do not, so whole-prompt length mixes
/// signals of opposite sign.
fn question_stem(prompt: &str) -> Vec<&str> {
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = prompt[search..].find("Answer:") {
        let after = search + found + "Answer:".len();
        search = after;
        let rest = prompt[after..].trim_start_matches([' ', '\t']);
        let rest = rest.strip_prefix('\n').unwrap_or(rest);
        let Some(answer_end) = rest.find('\n') else { break };
        let answer = rest[..answer_end].trim();
        let tail = &rest[answer_end + 1..];
        let blank = tail.trim_start_matches([' ', '\t']);
        if !answer.is_empty() && answer.chars().count() <= 40 && blank.starts_with('\n') {
            let next = prompt.len() - blank.len() + 1;
            if prompt[next..].trim().is_empty() {
                break;
            }
            start = next;
        }
    }
    prompt[start..].lines().filter(|line| !is_option_line(line)).collect()
}

/// Numbers written with digits (`3`, `4.5`, `1,000` count once each).
fn count_numbers(text: &str) -> usize {
    let mut count = 0;
    let mut previous: Option<char> = None;
    let mut in_number = false;
    for character in text.chars() {
        if character.is_ascii_digit() {
            if !in_number {
                count += 1;
                in_number = true;
            }
        } else if !(in_number && matches!(character, '.' | ',') && previous.is_some_and(|p| p.is_ascii_digit())) {
            in_number = false;
        }
        previous = Some(character);
    }
    count
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
        let few_shot = "Is ice cold?\nA) yes\nB) no\nAnswer:\nA\n\nWhat is 12 plus 30.5?\nA) 42.5\nB) 41\nAnswer:";
        assert_eq!(question_stem(few_shot), vec!["What is 12 plus 30.5?", "Answer:"]);
        let inline = "Q1 here\nAnswer: B\n\nQ2 with 3 and 1,000 apples\nAnswer:";
        assert_eq!(question_stem(inline), vec!["Q2 with 3 and 1,000 apples", "Answer:"]);
        assert_eq!(count_numbers("Take 3 and 1,000 apples, 4.5 kg, then 7."), 4);
        assert_eq!(
            question_stem("plain question, no examples"),
            vec!["plain question, no examples"]
        );
        assert!(extract("").iter().all(|value| value.is_finite()));
    }
}
