//! `dagrun report` checked in a real browser: the page of a real run is opened
//! in headless Chromium (Debian package `chromium`; `.ci/run` installs it)
//! with every host name unresolvable, screenshotted and its DOM dumped; the
//! screenshot must not be blank, the console must stay silent, and every
//! chart must be an SVG in the rendered DOM.

use super::drift::{dagrun, ok, workspace};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What the browser saw.
struct Seen {
    png: Vec<u8>,
    dom: String,
    /// Lines the page wrote to the console (errors, failed loads, anything).
    console: Vec<String>,
}

/// Open `html` in headless Chromium twice (screenshot, DOM dump) with a fresh
/// profile each time and no name resolution (nothing can be fetched).
fn browse(html: &Path, tmp: &Path) -> Seen {
    let url = format!("file://{}", html.display());
    let run = |what: &[&str], profile: &str| -> Output {
        let mut c = Command::new("chromium");
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1280,1800",
        ]);
        c.arg(format!("--user-data-dir={}", tmp.join(profile).display()));
        c.args(what).arg(&url);
        c.output().unwrap_or_else(|e| panic!("cannot start chromium ({e}): install the Debian package `chromium` (.ci/run does)"))
    };
    let shot = tmp.join("shot.png");
    let a = run(&[&format!("--screenshot={}", shot.display())], "profile-shot");
    assert!(a.status.success(), "chromium --screenshot failed: {}", String::from_utf8_lossy(&a.stderr));
    let b = run(&["--dump-dom"], "profile-dom");
    assert!(b.status.success(), "chromium --dump-dom failed: {}", String::from_utf8_lossy(&b.stderr));
    let console = [&a.stderr, &b.stderr]
        .iter()
        .flat_map(|e| String::from_utf8_lossy(e).lines().filter(|l| l.contains(":CONSOLE")).map(String::from).collect::<Vec<_>>())
        .collect();
    Seen { png: std::fs::read(&shot).unwrap(), dom: String::from_utf8_lossy(&b.stdout).into_owned(), console }
}

/// (width, height, share of pixels that differ from the most common colour, distinct colours)
fn png_stats(bytes: &[u8]) -> (u32, u32, f64, usize) {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    let ch = info.color_type.samples();
    let px: Vec<&[u8]> = buf[..info.buffer_size()].chunks(ch).collect();
    let mut counts = std::collections::HashMap::new();
    for p in &px {
        *counts.entry(&p[..3.min(ch)]).or_insert(0usize) += 1;
    }
    let top = counts.values().max().copied().unwrap_or(0);
    (info.width, info.height, 1.0 - top as f64 / px.len() as f64, counts.len())
}

/// Each `data-chart="NAME"` figure of the DOM holds an `<svg>`; returns how many such figures.
fn charts_with_svg(dom: &str, name: &str) -> usize {
    let needle = format!("data-chart=\"{name}\"");
    let mut n = 0;
    for (i, _) in dom.match_indices(&needle) {
        let rest = &dom[i..];
        let end = rest.find("</figure>").expect("unclosed figure");
        assert!(rest[..end].contains("<svg"), "figure {name} has no <svg>");
        n += 1;
    }
    n
}

fn assert_offline(html: &str) {
    for bad in ["<script", "<link", "<iframe", "@import", "url(", " src=", "<img"] {
        assert!(!html.contains(bad), "the report must be self-contained, found {bad:?}");
    }
    for (i, _) in html.match_indices("http") {
        let tail = &html[i..(i + 40).min(html.len())];
        assert!(tail.starts_with("http://www.w3.org/2000/svg") || tail.starts_with("http://www.w3.org/1999/xlink"), "external reference: {tail}");
    }
}

#[test]
fn the_console_scan_and_blank_check_can_fail() {
    // The checks below would catch a broken page: a script error and a blank page.
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.html");
    std::fs::write(&bad, "<!DOCTYPE html><html><body style=\"background:#fff\"><script>console.error('broken chart')</script></body></html>").unwrap();
    let seen = browse(&bad, d.path());
    assert!(seen.console.iter().any(|l| l.contains("broken chart")), "{:?}", seen.console);
    let (_, _, non_bg, colours) = png_stats(&seen.png);
    assert!(non_bg < 0.001 && colours <= 2, "a blank page must look blank: {non_bg} {colours}");
}

#[test]
fn report_of_a_nightly_run_opens_offline_in_chromium_with_every_section() {
    let d = workspace();
    let ws = d.root.as_path();
    // Default pipeline, then a "nightly" run on new data (another seed): drift
    // is measured against the first models, then the models are retrained.
    ok(&dagrun(ws, &["run", "pipelines/propensity.yaml", "-p", "rows=6000", "-j", "2"]));
    ok(&dagrun(ws, &["run", "pipelines/propensity.yaml", "-p", "rows=6000", "-p", "seed=7", "-j", "2"]));
    let out = d.root.as_path().join("out/report.html");
    let printed = ok(&dagrun(ws, &["report", "last", "-o", out.to_str().unwrap()]));
    assert_eq!(PathBuf::from(printed.trim()), out);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_offline(&html);
    for id in ["dag", "timeline", "models", "drift", "params", "stages"] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "section {id} missing");
    }
    for t in ["Tenant_A", "Tenant_B"] {
        assert!(html.contains(&format!("data-tenant=\"{t}\"")), "no model card for {t}");
        assert!(html.contains(&format!("<td>{t}</td><td>Recency_Days</td>")), "no drift row for {t}");
    }
    assert!(html.contains("Confusion matrix at 0.5") && html.contains("test AUC"));
    assert!(html.contains("<td>seed</td><td>7</td>"), "params table");
    assert!(html.contains("param seed: 42 → 7"), "rerun reasons");
    let dot_installed = Command::new("dot").arg("-V").output().is_ok_and(|o| o.status.success());
    assert_eq!(html.contains("Layout: Graphviz dot"), dot_installed, "auto layout uses dot exactly when it is installed");
    assert!(!html.contains("No hold-out curves") && !html.contains("No model:") && !html.contains("no reference"), "every section filled");

    let seen = browse(&out, d.root.as_path());
    assert!(seen.console.is_empty(), "console output: {:?}", seen.console);
    let (w, h, non_bg, colours) = png_stats(&seen.png);
    assert_eq!((w, h), (1280, 1800));
    assert!(non_bg > 0.05 && colours > 50, "screenshot looks blank: {non_bg} non-background, {colours} colours");
    assert_eq!(charts_with_svg(&seen.dom, "dag"), 1);
    assert_eq!(charts_with_svg(&seen.dom, "timeline"), 1);
    for chart in ["roc", "calibration", "coefficients"] {
        assert_eq!(charts_with_svg(&seen.dom, chart), 2, "{chart}: one per tenant");
    }
    assert!(seen.dom.contains("<polyline"), "line charts drawn");
    assert!(seen.dom.contains("train[Tenant_A]") && seen.dom.contains("drift[Tenant_B]"), "DAG labels");

    // The built-in layout (no Graphviz) draws the same graph.
    let out2 = d.root.as_path().join("out/builtin.html");
    ok(&dagrun(ws, &["report", "last", "-o", out2.to_str().unwrap(), "--layout", "builtin"]));
    let html2 = std::fs::read_to_string(&out2).unwrap();
    assert!(html2.contains("Layout: built-in layered layout"));
    let dag = &html2[html2.find("data-chart=\"dag\"").unwrap()..];
    let dag = &dag[..dag.find("</figure>").unwrap()];
    assert!(dag.contains("serve-check[Tenant_A]") && dag.matches("<rect").count() >= 2 * 14, "{}", &dag[..dag.len().min(400)]);
    let seen = browse(&out2, d.root.as_path());
    assert!(seen.console.is_empty(), "{:?}", seen.console);

    // An older run's report reads that run's models from the cache even after
    // a later run replaced them.
    let first = {
        let v: serde_json::Value = serde_json::from_str(&ok(&dagrun(ws, &["runs", "--json"]))).unwrap();
        v["runs"][0]["run_id"].as_str().unwrap().to_string()
    };
    let out3 = d.root.as_path().join("out/first.html");
    ok(&dagrun(ws, &["report", &first, "-o", out3.to_str().unwrap()]));
    let html3 = std::fs::read_to_string(&out3).unwrap();
    assert!(html3.contains("<tr><th>read from</th><td>cache</td></tr>"), "first run's models come from the cache");
    assert!(html3.contains("no model yet to compare with"));
    // After `gc` dropped them from the cache (not champions), the registry's
    // copies of those models are read (helper-64 #10: "No model").
    ok(&dagrun(ws, &["gc", "--keep-runs", "1"]));
    ok(&dagrun(ws, &["report", &first, "-o", out3.to_str().unwrap()]));
    let html4 = std::fs::read_to_string(&out3).unwrap();
    assert!(
        html4.contains("<tr><th>read from</th><td>model registry</td></tr>") && !html4.contains("No model:"),
        "{}",
        &html4[html4.find("id=\"models\"").unwrap_or(0)..][..600]
    );
}

#[test]
fn everything_from_files_is_escaped() {
    let d = tempfile::tempdir().unwrap();
    let ws = d.path();
    std::fs::create_dir_all(ws.join(".dagrun")).unwrap();
    std::fs::write(
        ws.join("pipeline.yaml"),
        "params:\n  note: plain\nstages:\n  say:\n    cmd: printf '%s' \"${params.note}\" > said.txt\n    outs: [said.txt]\n",
    )
    .unwrap();
    ok(&dagrun(ws, &["run", "pipeline.yaml"]));
    ok(&dagrun(ws, &["run", "pipeline.yaml", "-p", "note=<b id=x>bold</b>&amp;"]));
    let out = ws.join("r.html");
    ok(&dagrun(ws, &["report", "-o", out.to_str().unwrap()]));
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(!html.contains("<b id=x>"), "unescaped param in the page");
    assert!(html.contains("&lt;b id=x&gt;bold&lt;/b&gt;&amp;amp;"), "params and reasons are shown escaped");
    assert!(html.contains("No train stage in this run") && html.contains("No drift stage in this run"));
    assert_offline(&html);
    // No such run: exit 2, nothing written.
    let o = dagrun(ws, &["report", "nope", "-o", ws.join("x.html").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!ws.join("x.html").exists());
    // A run record with impossible timing is refused, naming the file.
    let rec = std::fs::read_dir(ws.join("runs")).unwrap().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).max().unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    v["stages"][0]["end_s"] = serde_json::json!(-1.0);
    std::fs::write(&rec, serde_json::to_vec(&v).unwrap()).unwrap();
    let o = dagrun(ws, &["report", "last", "-o", ws.join("y.html").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("finite and ≥ 0"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!ws.join("y.html").exists());
}

/// A run record is not trusted: the pipeline file it names is read only if it
/// is a YAML file outside `.dagrun/`, and a load error on the page quotes no
/// value of that file (an edited record naming the master key file, or a
/// CSV of customers saved as `.yaml`, put their content in the page).
#[test]
fn the_page_never_quotes_the_file_an_edited_record_names() {
    let d = tempfile::tempdir().unwrap();
    let ws = d.path();
    std::fs::create_dir_all(ws.join(".dagrun")).unwrap();
    std::fs::write(ws.join("pipeline.yaml"), "stages:\n  say:\n    cmd: echo hi > said.txt\n    outs: [said.txt]\n").unwrap();
    ok(&dagrun(ws, &["run", "pipeline.yaml"]));
    let key = std::fs::read_to_string(ws.join(".dagrun/keys/master.key")).unwrap();
    let key = key.trim();
    assert_eq!(key.len(), 64);
    std::fs::write(ws.join("people.yaml"), "Customer_ID,Email\n1,jane.doe@example.com\n").unwrap();
    std::fs::write(ws.join("pin.yml"), "314584655242\n").unwrap();
    std::fs::write(ws.join("odd.yaml"), "stages:\n  a:\n    cmd: echo\n    jane.doe@example.com: 1\n").unwrap();
    std::fs::write(ws.join("notes.txt"), "CUST_0042_ssn_078051120: 1\n").unwrap();
    std::os::unix::fs::symlink(ws.join("notes.txt"), ws.join("notes.yaml")).unwrap();
    let rec = std::fs::read_dir(ws.join("runs")).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).unwrap();
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    let cases = [
        (".dagrun/keys/master.key", "not a pipeline file"),
        ("./.dagrun/keys/../keys/master.key", "not a pipeline file"),
        ("people.yaml", "invalid type: string (40 characters)"),
        ("pin.yml", "invalid type: integer, expected"),
        ("odd.yaml", "unknown field (a name of 20 characters, not shown"),
        ("notes.yaml", "not a pipeline file"),
    ];
    for (named, says) in cases {
        let mut v = original.clone();
        v["pipeline"] = serde_json::Value::from(named);
        std::fs::write(&rec, serde_json::to_vec(&v).unwrap()).unwrap();
        let out = ws.join("r.html");
        ok(&dagrun(ws, &["report", "last", "-o", out.to_str().unwrap()]));
        let html = std::fs::read_to_string(&out).unwrap();
        assert!(html.contains(says), "{named}: {}", html.lines().filter(|l| l.contains("load")).collect::<Vec<_>>().join("\n"));
        for secret in [key, "jane.doe", "314584655242", "078051120"] {
            assert!(!html.contains(secret), "{named}: the page holds {secret}");
        }
    }
    // The user's own mistake on the command line is described the same way.
    let o = dagrun(ws, &["dag", "people.yaml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("jane.doe"), "{}", String::from_utf8_lossy(&o.stderr));
}
