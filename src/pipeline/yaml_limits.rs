//! Limits checked on YAML text *before* it is parsed, in one linear pass.
//!
//! # Rules
//! - Nesting depth (block indentation levels, compact `- - -` entries and
//!   `[`/`{` flow collections together) is at most [`MAX_YAML_DEPTH`]. The
//!   YAML parser's own recursion guard fires only after quadratic work (a
//!   1 MiB file of `[` took minutes); this scan refuses it in milliseconds.
//! - At most [`MAX_YAML_ALIASES`] aliases (`*name`); what aliases expand to is
//!   bounded separately while parsing (`check_yaml_budget`).
//! - The scan knows where YAML starts a token (so a `[`, `'` or `*` inside a
//!   plain scalar such as `cmd: echo it's [x]` is text), skips quoted
//!   scalars, comments and block scalars (`|`, `>`). Where it cannot be exact
//!   it over-counts, never under-counts; the limits are far above any real
//!   pipeline or tenant list (they use fewer than 10 levels).

/// Deepest nesting accepted.
pub const MAX_YAML_DEPTH: usize = 64;
/// Most aliases accepted.
pub const MAX_YAML_ALIASES: usize = 4096;

/// `Err((line, message))` when `text` is nested too deeply or has too many aliases.
pub fn check(text: &str) -> Result<(), (usize, String)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut aliases = 0usize;
    let mut in_single = false;
    let mut in_double = false;
    // Block scalar: lines indented more than this belong to it.
    let mut block_scalar: Option<usize> = None;
    for (ln, line) in text.split('\n').enumerate() {
        let lineno = ln + 1;
        let b = line.as_bytes();
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let blank = b[indent..].iter().all(|c| c.is_ascii_whitespace());
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        if blank {
            continue;
        }
        let mut i = indent;
        if !in_single && !in_double && flow == 0 {
            if b[i] == b'#' {
                continue;
            }
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            if indents.len() > MAX_YAML_DEPTH {
                return Err((lineno, too_deep()));
            }
        }
        let mut dashes = 0usize;
        let mut at_start = !in_single && !in_double;
        let depth = |indents: &Vec<usize>, dashes: usize, flow: usize| indents.len() + dashes + flow;
        while i < b.len() {
            let c = b[i];
            if in_single {
                if c == b'\'' {
                    if b.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    in_single = false;
                }
                i += 1;
                continue;
            }
            if in_double {
                if c == b'\\' {
                    i += 2;
                    continue;
                }
                if c == b'"' {
                    in_double = false;
                }
                i += 1;
                continue;
            }
            let next_is_space = b.get(i + 1).is_none_or(|n| n.is_ascii_whitespace());
            if c == b' ' || c == b'\t' || c == b'\r' {
                i += 1;
                continue;
            }
            if c == b'#' && (i == 0 || matches!(b[i - 1], b' ' | b'\t')) {
                break; // comment
            }
            if at_start {
                match c {
                    b'\'' => in_single = true,
                    b'"' => in_double = true,
                    b'[' | b'{' => {
                        flow += 1;
                        let d = depth(&indents, dashes, flow);
                        if d > MAX_YAML_DEPTH {
                            return Err((lineno, too_deep()));
                        }
                    }
                    b']' | b'}' => {
                        flow = flow.saturating_sub(1);
                        at_start = false;
                    }
                    b'-' | b'?' | b':' if next_is_space && flow == 0 => {
                        dashes += 1;
                        if depth(&indents, dashes, flow) > MAX_YAML_DEPTH {
                            return Err((lineno, too_deep()));
                        }
                    }
                    b'|' | b'>' if flow == 0 => {
                        block_scalar = Some(indent);
                        break;
                    }
                    b'&' | b'!' | b'*' => {
                        if c == b'*' {
                            aliases += 1;
                            if aliases > MAX_YAML_ALIASES {
                                return Err((lineno, format!("the YAML has more than {MAX_YAML_ALIASES} aliases (*name); use fewer aliases")));
                            }
                        }
                        // Skip the anchor/tag/alias name; still at a token start.
                        while i < b.len() && !b[i].is_ascii_whitespace() && !(flow > 0 && matches!(b[i], b',' | b']' | b'}')) {
                            i += 1;
                        }
                        continue;
                    }
                    b',' if flow > 0 => {}
                    _ => at_start = false,
                }
                i += 1;
                continue;
            }
            // Inside a plain scalar (or after a quoted one).
            match c {
                b']' | b'}' if flow > 0 => flow -= 1,
                b',' if flow > 0 => at_start = true,
                b':' if next_is_space || (flow > 0 && matches!(b.get(i + 1), Some(b',' | b']' | b'}'))) => at_start = true,
                _ => {}
            }
            i += 1;
        }
    }
    Ok(())
}

fn too_deep() -> String {
    format!("the YAML is nested too deeply here (more than {MAX_YAML_DEPTH} levels of lists and maps inside each other); is the file damaged?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_files_pass() {
        for f in ["pipelines/propensity.yaml", "pipelines/propensity-ingest.yaml", "config/tenants.yaml"] {
            let t = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f)).unwrap();
            check(&t).unwrap_or_else(|e| panic!("{f}: {e:?}"));
        }
        check("a: [1, [2, {b: c}]]\ncmd: echo it's [x] {y} *z &w\nd: 'it''s [' \ne: \"[\\\"\"\nf: |\n  [[[[[[\n  it's\ng: *anchor\n").unwrap();
    }

    #[test]
    fn deep_nesting_and_alias_floods_are_refused_fast() {
        let t0 = std::time::Instant::now();
        let flow = "[".repeat(1 << 20);
        assert_eq!(check(&flow).unwrap_err().0, 1);
        let compact = "- ".repeat(1 << 19);
        assert!(check(&compact).is_err());
        let mut block = String::new();
        for i in 0..100 {
            block.push_str(&" ".repeat(i));
            block.push_str("k:\n");
        }
        assert_eq!(check(&block).unwrap_err().0, MAX_YAML_DEPTH + 1);
        let aliases = "a: &a x\nb: [".to_string() + &"*a, ".repeat(MAX_YAML_ALIASES + 1) + "]\n";
        assert!(check(&aliases).unwrap_err().1.contains("aliases"));
        // A quote in a block scalar does not hide what follows it.
        let hidden = "a: |\n  it's\nb: ".to_string() + &"[".repeat(1000);
        assert_eq!(check(&hidden).unwrap_err().0, 3);
        let hidden = "cmd: echo it's\nb: ".to_string() + &"[".repeat(1000);
        assert_eq!(check(&hidden).unwrap_err().0, 2);
        assert!(t0.elapsed().as_secs_f64() < 2.0, "{:?}", t0.elapsed());
    }
}
