//! Words and lines for the demo's output: counts that agree with their number ("1 error",
//! "2 errors"), and long lines wrapped at word boundaries for a terminal of 100 columns.

/// The widest line a terminal of 100 columns shows without wrapping it itself (one column stays
/// free, so that a line that fills the width does not push the cursor onto the next row).
pub const WIDTH: usize = 99;

/// How far a wrapped line's continuation rows are indented, so they read as one line.
const CONTINUATION: &str = "  ";

/// `n` and `noun`, plural unless `n` is 1: "1 error", "0 errors", "12 requests".
pub fn count(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// `line` in rows of at most `width` characters, broken at spaces; the rows after the first are
/// indented. A word longer than a row (a path, say) is broken where the row ends.
pub fn wrap(line: &str, width: usize) -> Vec<String> {
    let width = width.max(CONTINUATION.len() + 8);
    let line = line.trim_end();
    if line.chars().count() <= width {
        return vec![line.to_owned()];
    }
    let mut rows = Vec::new();
    // The row being filled, its width in characters, and whether it holds no word yet.
    let mut row = String::new();
    let mut filled = 0;
    let mut fresh = true;
    // The leading spaces of the line (an indented line stays indented) count as part of its
    // first word.
    let indent_len = line.len() - line.trim_start().len();
    let (indent, rest) = line.split_at(indent_len);
    for (i, word) in rest.split(' ').enumerate() {
        let word = if i == 0 { format!("{indent}{word}") } else { word.to_owned() };
        let len = word.chars().count();
        // Two spaces in a row (between columns) stay two, except at the start of a row.
        if len == 0 && fresh {
            continue;
        }
        let space = usize::from(!fresh);
        if filled + space + len <= width {
            if !fresh {
                row.push(' ');
            }
            row.push_str(&word);
            filled += space + len;
            fresh = false;
            continue;
        }
        // The word goes on the next row, broken if even a row of its own cannot hold it.
        if !fresh {
            rows.push(std::mem::take(&mut row));
            row.push_str(CONTINUATION);
            filled = CONTINUATION.len();
        }
        let mut chars: Vec<char> = word.chars().collect();
        while filled + chars.len() > width {
            let room = width - filled;
            row.extend(chars.drain(..room));
            rows.push(std::mem::take(&mut row));
            row.push_str(CONTINUATION);
            filled = CONTINUATION.len();
        }
        filled += chars.len();
        fresh = chars.is_empty();
        row.extend(chars);
    }
    if !fresh {
        rows.push(row);
    }
    rows
}

/// `line` in at most `rows` rows of `width` (see [`wrap`]); when it needs more, the last row
/// shown ends with "…".
pub fn wrap_within(line: &str, width: usize, rows: usize) -> Vec<String> {
    let mut wrapped = wrap(line, width);
    if wrapped.len() > rows.max(1) {
        wrapped.truncate(rows.max(1));
        if let Some(last) = wrapped.last_mut() {
            let mut chars: Vec<char> = last.chars().collect();
            chars.truncate(width.saturating_sub(1));
            *last = chars.into_iter().collect::<String>() + "…";
        }
    }
    wrapped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_number() {
        assert_eq!(count(1u64, "error"), "1 error");
        assert_eq!(count(0u64, "error"), "0 errors");
        assert_eq!(count(2u64, "error"), "2 errors");
        assert_eq!(count(1u32, "request"), "1 request");
    }

    #[test]
    fn a_long_line_wraps_at_spaces_with_its_rest_indented() {
        let line = "routes: none: each request goes to the faster of two instances picked at random (p2c-ewma); \
                    at this light load, mostly the one that answered fastest";
        let rows = wrap(line, 60);
        assert_eq!(
            rows,
            [
                "routes: none: each request goes to the faster of two",
                "  instances picked at random (p2c-ewma); at this light load,",
                "  mostly the one that answered fastest",
            ]
        );
        for row in &rows {
            assert!(row.chars().count() <= 60, "{row:?}");
        }
        // No word is cut: the rows hold the line's words, in order.
        let words: Vec<&str> = rows.iter().flat_map(|r| r.split_whitespace()).collect();
        assert_eq!(words, line.split_whitespace().collect::<Vec<_>>());
        assert_eq!(wrap("short", 60), ["short"]);
    }

    #[test]
    fn an_indented_line_keeps_its_indent_and_a_word_wider_than_a_row_is_broken() {
        let rows = wrap("  in force on every sidecar that calls frontend (1), 40 ms after the request", 40);
        assert_eq!(rows, ["  in force on every sidecar that calls", "  frontend (1), 40 ms after the request"]);
        let path = format!("logs /tmp/{}", "x".repeat(50));
        let rows = wrap(&path, 30);
        assert!(rows.iter().all(|r| r.chars().count() <= 30), "{rows:?}");
        assert_eq!(rows.concat().replace(' ', ""), path.replace(' ', ""));
    }

    #[test]
    fn a_line_held_to_fewer_rows_says_it_goes_on() {
        let line = "a ".repeat(100);
        let rows = wrap_within(&line, 40, 2);
        assert_eq!(rows.len(), 2);
        assert!(rows[1].ends_with('…') && rows[1].chars().count() <= 40, "{rows:?}");
        assert_eq!(wrap_within("short", 40, 2), ["short"]);
    }
}
