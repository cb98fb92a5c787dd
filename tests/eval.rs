//! `routellm eval`, `calibrate` and `score` on RouteLLM's real eval data (read from
//! `../shared/data/routellm`) and on fixtures in RouteLLM's formats.

#![allow(clippy::unwrap_used, clippy::format_collect)] // test code: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;

use routellm::config::{Config, FileConfig, Overrides};
use routellm::eval::benchmark::{self, BenchmarkKind};
use routellm::eval::{self, EvalOptions};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/routellm")
}

fn config() -> Config {
    Config::merge(FileConfig::default(), Overrides::default()).unwrap()
}

fn options(benchmark: BenchmarkKind, output: PathBuf) -> EvalOptions {
    EvalOptions {
        routers: vec!["random".into()],
        benchmark,
        data_dir: Some(data_dir()),
        output,
        num_results: 10,
        random_iters: 10,
        bootstrap: 200,
        strong_model: None,
        weak_model: None,
        overwrite_cache: false,
        seed: 0,
    }
}

#[test]
fn mmlu_and_gsm8k_reproduce_routellm_model_scores() {
    let mmlu = benchmark::load(&BenchmarkKind::Mmlu, &data_dir(), None, None).unwrap();
    assert_eq!(mmlu.prompts.len(), 14_037);
    assert_eq!(mmlu.dropped, 5);
    let strong = eval::metrics::model_score(&mmlu.outcomes, true, 100.0);
    let weak = eval::metrics::model_score(&mmlu.outcomes, false, 100.0);
    assert_eq!(
        (format!("{strong:.3}"), format!("{weak:.3}")),
        ("80.587".into(), "68.091".into())
    );
    // RouteLLM concatenates domains in ALL_MMLU_DOMAINS order: European history comes first.
    assert!(
        mmlu.prompts[0].contains("This question refers to the following information"),
        "{}",
        mmlu.prompts[0]
    );

    let gsm8k = benchmark::load(&BenchmarkKind::Gsm8k, &data_dir(), None, None).unwrap();
    assert_eq!(gsm8k.prompts.len(), 1_307);
    let strong = eval::metrics::model_score(&gsm8k.outcomes, true, 100.0);
    let weak = eval::metrics::model_score(&gsm8k.outcomes, false, 100.0);
    assert_eq!(
        (format!("{strong:.3}"), format!("{weak:.3}")),
        ("85.769".into(), "63.734".into())
    );
}

#[test]
fn mmlu_eval_reports_baselines_with_intervals_and_writes_files() {
    let scratch = tempfile::tempdir().unwrap();
    let output = scratch.path().to_path_buf();
    let report = eval::run(&options(BenchmarkKind::Mmlu, output.clone()), &config()).unwrap();
    let random = &report.routers["random"];
    assert!((random.apgr - 0.5).abs() < 0.03, "random APGR {}", random.apgr);
    let [lo, hi] = random.apgr_ci95.unwrap();
    assert!(lo < random.apgr && random.apgr < hi && hi - lo < 0.08, "{lo} {hi}");
    let length = &report.routers["length"];
    assert!((0.55..0.62).contains(&length.apgr), "length APGR {}", length.apgr);
    assert_eq!(random.curve.len(), 11);
    // The curve spans 0% to 100% strong calls and ends at the two models' scores.
    let ends: Vec<f64> = [0.0, 100.0]
        .iter()
        .map(|pct| {
            length
                .curve
                .iter()
                .find(|p| (p.strong_pct - pct).abs() < 1e-9)
                .unwrap()
                .score
        })
        .collect();
    assert!((ends[0] - report.weak_score).abs() < 1e-9 && (ends[1] - report.strong_score).abs() < 1e-9);
    assert_eq!(report.optimal.len(), 11);
    assert!(report.optimal[10].score >= report.strong_score);

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(output.join("mmlu.json")).unwrap()).unwrap();
    for key in [
        "benchmark",
        "strong_model",
        "weak_model",
        "strong_score",
        "weak_score",
        "n_prompts",
        "routers",
        "optimal",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    let router = &json["routers"]["length"];
    for key in ["apgr", "apgr_ci95", "auc", "cpt", "curve"] {
        assert!(router.get(key).is_some(), "{key}");
    }
    assert!(router["cpt"]["50"].is_number());
    assert!(router["curve"][0].get("threshold").is_some());
    let lines = std::fs::read_to_string(output.join("mmlu-scores.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2 * 14_037);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["router"].as_str(), first["index"].as_u64()),
        (Some("random"), Some(0))
    );
    let png = std::fs::read(output.join("mmlu.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Scores are cached per benchmark and router.
    assert!(output.join(".cache/mmlu/length.json").exists());
}

fn write_generic(dir: &Path, rows: &[(&str, f64, f64)]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("team.jsonl");
    let text: String = rows
        .iter()
        .map(|(prompt, big, small)| {
            format!(
                "{}\n",
                serde_json::json!({"prompt": prompt, "scores": {"big": big, "small": small}})
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn tied_scores_do_not_crash_and_generic_benchmarks_work() {
    let scratch = tempfile::tempdir().unwrap();
    let output = scratch.path().to_path_buf();
    // Every prompt has the same length: the length router's edges all coincide, which
    // makes pd.qcut raise in RouteLLM.
    let rows: Vec<(&str, f64, f64)> = (0..40).map(|i| ("same", 8.0 + f64::from(i % 2), 5.0)).collect();
    let path = write_generic(&output, &rows);
    let mut opts = options(BenchmarkKind::Generic(path), output.join("out"));
    opts.strong_model = Some("big".into());
    opts.weak_model = Some("small".into());
    let report = eval::run(&opts, &config()).unwrap();
    assert_eq!(report.benchmark, "team");
    assert_eq!(report.strong_score, 8.5);
    assert_eq!(report.weak_score, 5.0);
    let length = &report.routers["length"];
    assert_eq!(length.curve.len(), 11);
    assert!(output.join("out/team.png").exists());

    for (num_results, random_iters, flag) in [(0, 10, "--num-results"), (10, 0, "--random-iters")] {
        opts.num_results = num_results;
        opts.random_iters = random_iters;
        let error = eval::run(&opts, &config()).unwrap_err().to_string();
        assert!(error.contains(&format!("{flag} must be at least 1")), "{error}");
    }
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_routellm"))
}

/// `routellm score --routers length` over `input`, with `extra` arguments: the win rates in order.
fn length_scores(input: &std::path::Path, extra: &[&str]) -> Vec<f64> {
    let output = binary()
        .args(["score", "--routers", "length", "--input"])
        .arg(input)
        .args(extra)
        .env_remove("ROUTELLM_SCORE_TURNS")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["win_rate"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Ten prompts of growing length, labelled as `routellm label` writes them: the strong model
/// wins the three longest, the two models tie on the rest.
fn ten_labelled_prompts(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let labels = dir.join("labels.jsonl");
    let text: String = (0..10)
        .map(|i| {
            let strong = if i >= 7 { 1.0 } else { 0.5 };
            format!(
                "{}\n",
                serde_json::json!({
                    "prompt": "word ".repeat(i * 20 + 1), "model_a": "openai/gpt-4o", "model_b": "groq/llama3",
                    "p_b_wins": 1.0 - strong, "scores": {"openai/gpt-4o": strong, "groq/llama3": 1.0 - strong},
                    "judge": "openai/gpt-4o",
                })
            )
        })
        .collect();
    std::fs::write(&labels, text).unwrap();
    labels
}

/// `calibrate --routers length` with `args`, and `labels` as its `--benchmark` when given.
fn calibrate_length(args: &[&str], labels: Option<&Path>) -> std::process::Output {
    let mut command = binary();
    command.args(["calibrate", "--routers", "length"]).args(args);
    if let Some(labels) = labels {
        command.arg("--benchmark").arg(labels);
    }
    command.output().unwrap()
}

/// `calibrate --json --target-pgr` with the length router on a labelled file.
fn calibrate_to_quality(labels: &Path, target: &str, extra: &[&str]) -> serde_json::Value {
    let output = calibrate_length(&[&["--json", "--target-pgr", target], extra].concat(), Some(labels));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
}

#[test]
fn calibrate_to_a_quality_target_on_a_labelled_file_sends_the_fewest_prompts_that_keep_it() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let labels = ten_labelled_prompts(&dir);
    let calibrate = |target: &str| calibrate_to_quality(&labels, target, &[]);
    let all = calibrate("1");
    assert_eq!(all["achieved_pct"], 0.3, "{all}");
    assert_eq!(all["achieved_pgr"], 1.0, "{all}");
    let most = calibrate("0.6");
    assert!((most["achieved_pct"].as_f64().unwrap() - 0.2).abs() < 1e-12, "{most}");
    assert!(
        (most["achieved_pgr"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12,
        "{most}"
    );
    // The threshold, served, sends exactly the two longest prompts to the strong model.
    let threshold = most["threshold"].as_f64().unwrap();
    let sent = length_scores(&labels, &[])
        .iter()
        .filter(|score| **score >= threshold)
        .count();
    assert_eq!(sent, 2);
    // A share or a quality target, not both; a target needs labelled prompts.
    let both = calibrate_length(&["--strong-model-pct", "0.5", "--target-pgr", "0.9"], Some(&labels));
    assert!(!both.status.success());
    let alone = calibrate_length(&["--target-pgr", "0.9"], None);
    assert!(!alone.status.success());
}

#[test]
fn calibrate_to_a_quality_target_with_confidence_pays_for_what_the_sample_cannot_promise() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    let labels = ten_labelled_prompts(&dir);
    // Resampled, two prompts keep 60% only when the third is drawn less often than they
    // are; asked for 95% confidence, the third is sent too, which keeps all of it in every
    // replicate.
    let point_meets = calibrate_to_quality(&labels, "0.6", &[])["replicates_meeting_target"]
        .as_f64()
        .unwrap();
    assert!(point_meets < 0.95, "{point_meets}");
    let careful = calibrate_to_quality(&labels, "0.6", &["--confidence", "0.95", "--bootstrap", "400"]);
    assert_eq!(careful["confidence"], 0.95, "{careful}");
    assert!(
        (careful["achieved_pct"].as_f64().unwrap() - 0.3).abs() < 1e-12,
        "{careful}"
    );
    assert_eq!(careful["replicates_meeting_target"], 1.0, "{careful}");
    assert_eq!(careful["pgr_interval"], serde_json::json!([1.0, 1.0]), "{careful}");
    let sentence = calibrate_length(&["--target-pgr", "0.6", "--confidence", "0.95"], Some(&labels));
    let sentence = String::from_utf8(sentence.stdout).unwrap();
    assert!(sentence.contains("with 95% confidence"), "{sentence}");
    assert!(sentence.contains("in 100.0% of 1000 resamples"), "{sentence}");
    let no_target = calibrate_length(&["--strong-model-pct", "0.5", "--confidence", "0.9"], None);
    assert!(!no_target.status.success());
}

#[test]
fn calibrate_hits_the_share_on_a_prompts_file_and_score_agrees() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("traffic.jsonl");
    let text: String = (0..200)
        .map(|i| {
            if i % 2 == 0 {
                format!("{}\n", serde_json::json!({"prompt": "x".repeat(i * 7 + 1)}))
            } else {
                format!(
                    "{}\n",
                    serde_json::json!({"messages": [{"role": "user", "content": "y".repeat(i * 7 + 1)}]})
                )
            }
        })
        .collect();
    std::fs::write(&prompts, text).unwrap();
    let calibrate = |extra: &[&str]| {
        let output = binary()
            .args([
                "calibrate",
                "--routers",
                "length",
                "random",
                "--strong-model-pct",
                "0.3",
                "--prompts",
            ])
            .arg(&prompts)
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let stdout = calibrate(&[]);
    let mut lines = stdout.lines();
    let length_line = lines.next().unwrap();
    assert!(
        length_line.starts_with("For 30.0% strong model calls for length, threshold = "),
        "{length_line}"
    );
    assert_eq!(
        lines.next().unwrap(),
        "For 30.0% strong model calls for random, threshold = 0.70000"
    );
    let threshold: f64 = length_line.rsplit(' ').next().unwrap().parse().unwrap();

    let rates = length_scores(&prompts, &[]);
    assert_eq!(rates.len(), 200);
    let strong = rates.iter().filter(|rate| **rate >= threshold).count();
    assert_eq!(strong, 60, "30% of 200 prompts");

    // For scripts: the same thresholds, one JSON object per router.
    let json: Vec<serde_json::Value> = calibrate(&["--json"])
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0]["router"], "length");
    assert_eq!(json[0]["threshold"].as_f64(), Some(threshold));
    assert_eq!(json[0]["strong_model_pct"].as_f64(), Some(0.3));
    assert_eq!(json[0]["achieved_pct"].as_f64(), Some(0.3));
    assert_eq!(json[0]["prompts"], 200);
    assert_eq!(json[1]["router"], "random");
    assert_eq!(json[1]["threshold"].as_f64(), Some(0.7));
}

#[test]
fn score_and_calibrate_read_conversations_as_score_turns_says() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let conversations = dir.join("chats.jsonl");
    // Each conversation: a demanding first turn of 1000 * (i + 1) characters, then "ok".
    let text: String = (0..10)
        .map(|i| {
            let messages = serde_json::json!([
                {"role": "user", "content": "x".repeat(1000 * (i + 1))},
                {"role": "assistant", "content": "done"},
                {"role": "user", "content": "ok"},
            ]);
            format!("{}\n", serde_json::json!({"messages": messages}))
        })
        .collect();
    std::fs::write(&conversations, text).unwrap();
    let scores = |extra: &[&str]| length_scores(&conversations, extra);
    // The length router: chars / (chars + 1000).
    let last = scores(&[]);
    assert!(
        last.iter().all(|score| (score - 2.0 / 1002.0).abs() < 1e-12),
        "{last:?}"
    );
    let highest = scores(&["--score-turns", "max"]);
    for (i, score) in highest.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let chars = 1000.0 * (i + 1) as f64;
        assert!((score - chars / (chars + 1000.0)).abs() < 1e-12, "{i}: {score}");
    }
    // The config's setting applies unless the flag says otherwise.
    let config = dir.join("config.yaml");
    std::fs::write(&config, "score_turns: max\n").unwrap();
    let config_arg = config.to_str().unwrap();
    assert_eq!(scores(&["--config", config_arg]), highest);
    assert_eq!(scores(&["--config", config_arg, "--score-turns", "last"]), last);

    let output = binary()
        .args([
            "calibrate",
            "--routers",
            "length",
            "--strong-model-pct",
            "0.3",
            "--score-turns",
            "max",
            "--prompts",
        ])
        .arg(&conversations)
        .env_remove("ROUTELLM_SCORE_TURNS")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let threshold: f64 = stdout.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        highest.iter().filter(|score| **score >= threshold).count(),
        3,
        "{stdout}"
    );
}

#[test]
fn eval_cli_reports_missing_data_dir_clearly() {
    let output = binary()
        .args(["eval", "--benchmark", "gsm8k"])
        .env_remove("ROUTELLM_EVAL_DATA")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--data-dir is required"));
}

#[test]
fn mt_bench_fixture_evaluates_in_its_own_units() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mt_bench");
    let scratch = tempfile::tempdir().unwrap();
    let output = scratch.path().to_path_buf();
    let mut opts = options(BenchmarkKind::MtBench, output.clone());
    opts.data_dir = Some(fixture);
    let report = eval::run(&opts, &config()).unwrap();
    assert_eq!(report.benchmark, "mt-bench");
    // 10 questions, one dropped because its second turn is contaminated.
    assert_eq!(report.n_prompts, 9);
    assert!((1.0..=10.0).contains(&report.strong_score) && (1.0..=10.0).contains(&report.weak_score));
    assert!(report.strong_score > report.weak_score);
    let length = &report.routers["length"];
    assert!(length.apgr_ci95.is_some());
    // Scores stay in MT Bench's 1-10 unit at both ends of the curve.
    assert!(length.curve.iter().all(|p| (1.0..=10.0).contains(&p.score)));
    assert!(output.join("mt-bench.png").exists());
}
