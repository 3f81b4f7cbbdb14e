//! `flora bench layers` end to end on a tiny sweep: CSV columns and rows, chart and report.

use std::process::Command;

#[test]
fn tiny_sweep_writes_csv_chart_and_report() {
    let out = std::env::temp_dir().join(format!("flora-bench-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_flora"))
        .args(["bench", "layers", "--quick", "--dims", "48", "--ranks", "1,2", "--budget", "0.001", "--out"])
        .arg(&out)
        .env("RAYON_NUM_THREADS", "2")
        .status()
        .expect("run flora");
    assert!(status.success());
    let csv = std::fs::read_to_string(out.join("layers.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("d,b,l,r,pattern,method,ms_median,ratio_to_base"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    // 2 shapes x 2 patterns x (base + ia3 + 2 ranks x 6 rank-dependent methods)
    assert_eq!(rows.len(), 2 * 2 * (2 + 2 * 6), "{csv}");
    for r in &rows {
        assert_eq!(r.len(), 8);
        let ms: f64 = r[6].parse().unwrap();
        let ratio: f64 = r[7].parse().unwrap();
        assert!(ms > 0.0 && ratio > 0.0, "{r:?}");
    }
    for m in ["base", "lora-bmm", "lora", "flora-vectorized", "flora-merged", "flora-auto", "ia3", "gemm-stacked"] {
        assert!(rows.iter().any(|r| r[5] == m), "method {m} missing");
    }
    let svg = std::fs::read_to_string(out.join("layers.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("flora-auto"));
    let md = std::fs::read_to_string(out.join("layers.md")).unwrap();
    assert!(md.contains("Inflection rank"));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_flags_fail_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_flora")).args(["bench", "layers", "--ranks", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ranks must be positive"));
}
