//! The live screen of a terminal of 100 columns by 24 rows: long lines wrap at word boundaries
//! instead of being cut, and when the rows run short the least useful lines give way first, so
//! the header (where everything is) and the request table always show. A key's answer shows its
//! verdicts (in force or not, on how many sidecars) before its diff; the whole answer is in the
//! logs folder, `actions.log`.

use super::text::{WIDTH, count, wrap, wrap_within};

/// The rows a frame may take: one fewer than the terminal's 24, so that the row the cursor rests
/// on (where a typed key echoes) never scrolls the frame's first row away.
pub const ROWS: usize = 23;

/// The most rows a key's answer takes when the screen has room for more.
const ANSWER_ROWS: usize = 8;

/// One part of the live screen, in the order it shows.
pub struct Part {
    content: Content,
    /// The most rows it takes.
    max: usize,
    /// How it gives way when rows run short: at each stage (earliest first), the rows it keeps.
    steps: Vec<(u8, usize)>,
}

enum Content {
    Line(String),
    /// A key's answer, shown by [`answer`].
    Answer(String),
}

impl Part {
    /// A line, wrapped onto at most `max` rows.
    pub fn line(text: impl Into<String>, max: usize) -> Self {
        Self { content: Content::Line(text.into()), max, steps: Vec::new() }
    }

    /// A key's answer, in at most [`ANSWER_ROWS`] rows.
    pub fn answer(text: impl Into<String>) -> Self {
        Self { content: Content::Answer(text.into()), max: ANSWER_ROWS, steps: Vec::new() }
    }

    /// At `stage` of a short screen, it keeps `rows` rows (none: it goes).
    pub fn giving(mut self, stage: u8, rows: usize) -> Self {
        self.steps.push((stage, rows));
        self
    }

    /// Its rows, at most `rows` of them.
    fn rows(&self, rows: usize) -> Vec<String> {
        if rows == 0 {
            return Vec::new();
        }
        match &self.content {
            Content::Line(text) => wrap_within(text, WIDTH, rows),
            Content::Answer(text) => answer(text, rows),
        }
    }
}

/// The text of the live screen, top to bottom.
pub struct Live<'a> {
    /// Where everything is: addresses, the logs folder, the env file.
    pub header: &'a [String],
    pub status: String,
    pub routes: &'a str,
    /// The table's heading and rows, one per instance...
    pub heading: String,
    pub rows: Vec<String>,
    /// ...and the line under it: the span its SHARE column covers, with catalog's split by
    /// version over that span.
    pub span: String,
    pub last_request: Option<String>,
    pub last_error: Option<String>,
    pub keys: Option<String>,
    /// The last key's answer.
    pub answer: Option<&'a str>,
}

/// The parts of the live screen, and how each gives way on a screen short of rows: first the
/// line that never changes, then the last request and the answer's diff, then the wraps of the
/// other lines; the header's first rows, the table and the answer's verdicts last.
pub fn live(screen: &Live<'_>) -> Vec<Part> {
    let mut parts: Vec<Part> = screen.header.iter().map(|line| Part::line(line.as_str(), 2).giving(8, 1)).collect();
    parts.push(Part::line(screen.status.as_str(), 2).giving(8, 1));
    parts.push(Part::line("client -> frontend -> catalog -> inventory (gRPC); every hop sidecar to sidecar", 1).giving(0, 0));
    parts.push(Part::line(screen.routes, 3).giving(2, 2).giving(7, 1));
    parts.push(Part::line(screen.heading.as_str(), 1));
    parts.extend(screen.rows.iter().map(|row| Part::line(row.as_str(), 1)));
    parts.push(Part::line(screen.span.as_str(), 2).giving(5, 1).giving(9, 0));
    if let Some(request) = &screen.last_request {
        // Gone rather than cut: a request path cut short says little.
        parts.push(Part::line(request.as_str(), 2).giving(4, 0));
    }
    if let Some(error) = &screen.last_error {
        parts.push(Part::line(error.as_str(), 2).giving(5, 1));
    }
    if let Some(keys) = &screen.keys {
        parts.push(Part::line(keys.as_str(), 1).giving(10, 0));
    }
    if let Some(answer) = screen.answer {
        parts.push(Part::answer(answer).giving(1, 6).giving(3, 5).giving(6, 4).giving(8, 3).giving(9, 2).giving(11, 1));
    }
    parts
}

/// `parts` laid out in at most `rows` rows of at most [`WIDTH`] characters, each row ending with
/// a newline. When they need more, the parts give way stage by stage, as their steps say; what
/// still does not fit (an unusual screen) is cut at the last row.
pub fn fit(parts: &[Part], rows: usize) -> String {
    let mut shown: Vec<usize> = parts.iter().map(|p| p.rows(p.max).len()).collect();
    let last_stage = parts.iter().flat_map(|p| p.steps.iter().map(|(stage, _)| *stage)).max().unwrap_or(0);
    for stage in 0..=last_stage {
        if shown.iter().sum::<usize>() <= rows {
            break;
        }
        for (part, shown) in parts.iter().zip(shown.iter_mut()) {
            for (_, keep) in part.steps.iter().filter(|(s, _)| *s == stage) {
                *shown = (*shown).min(*keep);
            }
        }
    }
    let mut frame: Vec<String> = parts.iter().zip(&shown).flat_map(|(part, shown)| part.rows(*shown)).collect();
    frame.truncate(rows);
    frame.iter().map(|row| format!("{row}\n")).collect()
}

/// How much a line of a key's answer matters on a screen short of rows: 0 most.
fn weight(index: usize, line: &str) -> u8 {
    let indent = line.len() - line.trim_start().len();
    let line = line.trim();
    if line.contains("NOT IN FORCE") || line.contains("FAILED") {
        0
    } else if line.starts_with("in force on every sidecar")
        || line.contains(" enforced by every ")
        || line.starts_with("no sidecar calls")
    {
        // The verdict: whether the change is in force, and on how many sidecars.
        1
    } else if index == 0 {
        // What the answer is about: "[21s] canary: POST .../v1/apply with ...".
        2
    } else if indent <= 2 {
        // What each resource became ("Route catalog: version 12 (changed)", "DELETE ..."); the
        // diff under it is indented further.
        3
    } else if line.starts_with('+') || line.starts_with('-') {
        // A line the change adds or removes, before the diff's unchanged context.
        4
    } else {
        5
    }
}

/// A key's answer in at most `rows` rows: all of it when it fits, else its lines that matter
/// most (verdicts, then its title, then what each resource became, then the diff), in their
/// order, and a last row saying how many lines are left out and where they are.
pub fn answer(text: &str, rows: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let wrapped: Vec<Vec<String>> = lines.iter().map(|l| wrap(l, WIDTH)).collect();
    if wrapped.iter().map(Vec::len).sum::<usize>() <= rows {
        return wrapped.concat();
    }
    let mut order: Vec<usize> = (0..lines.len()).collect();
    order.sort_by_key(|&i| (weight(i, lines[i]), i));
    if rows <= 1 {
        return order.first().map(|&i| wrap_within(lines[i], WIDTH, 1)).unwrap_or_default();
    }
    // One row says what is left out.
    let room = rows - 1;
    let mut chosen: Vec<usize> = Vec::new();
    let mut used = 0;
    for i in order {
        let need = wrapped[i].len();
        if used + need > room {
            // The line that matters most shows even when it must be cut.
            if chosen.is_empty() {
                chosen.push(i);
            }
            break;
        }
        chosen.push(i);
        used += need;
    }
    chosen.sort_unstable();
    let mut shown: Vec<String> = chosen
        .iter()
        .flat_map(|&i| if wrapped[i].len() > room { wrap_within(lines[i], WIDTH, room) } else { wrapped[i].clone() })
        .collect();
    let left_out = lines.len() - chosen.len();
    shown.push(format!(
        "  ... {} left out: the whole answer is in actions.log in the logs folder",
        count(left_out as u64, "line")
    ));
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_short_of_rows_shows_what_changed_before_its_context() {
        let text = "[21s] header canary: POST /v1/apply\n  Route catalog: version …748 (changed)\n       kind: Route\n       service: catalog\n       rules:\n      -  - backends: [ { subset: v1 } ]\n      +  - name: opted-in\n";
        let shown = answer(text, 4);
        assert!(shown.iter().any(|l| l.contains("-  - backends: [ { subset: v1 } ]")), "{shown:#?}");
        assert!(!shown.iter().any(|l| l.contains("kind: Route")), "{shown:#?}");
    }

    /// The answer to `l` as the demo gives it, diff and all.
    fn lockdown_answer() -> String {
        let mut answer = String::from(
            "[356s] lockdown: POST https://127.0.0.1:7071/v1/apply with examples/routes/lockdown.yaml\n  \
             AuthorizationPolicy catalog: version 1796655541938275 (changed)\n",
        );
        for i in 0..10 {
            answer.push_str(&format!("      +  rule {i}: from [frontend]\n"));
        }
        answer.push_str(
            "  DELETE /v1/routes/catalog: deleted at version 1796655541938280 (another scenario's)\n  \
             authorization/catalog enforced by every catalog sidecar (2), 35 ms after the request\n  \
             in force on every sidecar that calls catalog (2), 40 ms after the request\n  \
             in force on every sidecar that calls frontend (1), 41 ms after the request\n",
        );
        answer
    }

    #[test]
    fn a_long_answer_is_cut_to_a_few_lines_that_fit_a_100_column_screen() {
        let shown = answer(&lockdown_answer(), 5);
        assert_eq!(shown.len(), 5, "{shown:#?}");
        assert!(shown.iter().all(|row| row.chars().count() <= WIDTH), "{shown:#?}");
        // The verdicts first, then what the answer is about; the diff is left out, and said so.
        assert!(shown[0].starts_with("[356s] lockdown: POST"), "{shown:#?}");
        assert!(shown[1].contains("authorization/catalog enforced by every catalog sidecar (2)"), "{shown:#?}");
        assert!(shown[2].contains("in force on every sidecar that calls catalog (2)"), "{shown:#?}");
        assert!(shown[3].contains("in force on every sidecar that calls frontend (1)"), "{shown:#?}");
        assert!(shown[4].contains("12 lines left out") && shown[4].contains("actions.log"), "{shown:#?}");
        // A short answer shows whole; a wide one wraps.
        let short = "[3s] \"x\" is not a key";
        assert_eq!(answer(short, 3), [short]);
        let wide = format!("[3s] {}", "word ".repeat(40));
        assert!(answer(&wide, 3).iter().all(|row| row.chars().count() <= WIDTH));
    }

    #[test]
    fn a_reset_shows_what_it_deleted_and_that_it_is_in_force() {
        let reset = "[356s] reset: deleting the demo's routes and catalog's authorization policy\n  \
                     DELETE https://127.0.0.1:7071/v1/authorizations/catalog: deleted at version 12\n  \
                     DELETE https://127.0.0.1:7071/v1/routes/catalog: deleted at version 13\n  \
                     DELETE https://127.0.0.1:7071/v1/routes/frontend: there was none\n  \
                     in force on every sidecar that calls catalog (2), 30 ms after the request\n  \
                     authorization/catalog enforced by every catalog sidecar (2), 31 ms after the request\n";
        let shown = answer(reset, 4);
        assert_eq!(shown.len(), 4, "{shown:#?}");
        assert!(shown[0].starts_with("[356s] reset: deleting"), "{shown:#?}");
        assert!(shown[1].contains("in force on every sidecar that calls catalog"), "{shown:#?}");
        assert!(shown[2].contains("authorization/catalog enforced"), "{shown:#?}");
        assert!(shown[3].contains("3 lines left out"), "{shown:#?}");
        // Short of rows, a failure is what shows.
        let failed = "[9s] canary: POST ...\n  Route catalog: version 3 (changed)\n  NOT IN FORCE: frontend-1 holds version 2";
        assert_eq!(answer(failed, 1), ["  NOT IN FORCE: frontend-1 holds version 2"]);
    }

    /// The screen of the review, at 100x24: header, status, a long routes line, the table with a
    /// long span, an error, and `answer`; with `extra` more header lines.
    fn review_screen(answer: &str, extra: usize) -> Vec<Part> {
        let mut header = vec![
            "grpc https://127.0.0.1:7070  api https://127.0.0.1:7071  dashboard https://127.0.0.1:7071/ui/".to_owned(),
            "client sidecar 127.0.0.1:15001 (admin 127.0.0.1:15000)  logs /tmp/ferry-demo-AbCdEf/logs".to_owned(),
            "ferryctl/curl: source /tmp/ferry-demo-AbCdEf/env (sidecar admins: FERRY_DEMO_*_ADMIN; ? lists them)".to_owned(),
        ];
        // More header lines: the usual ports were taken, say.
        header.extend(
            (0..extra)
                .map(|n| format!("               127.0.0.1:700{n} (something) cannot be bound: it listens on 127.0.0.1:4{n}")),
        );
        let rows = [("inventory", 1), ("inventory", 2), ("catalog", 1), ("catalog", 2), ("frontend", 1), ("frontend", 2)]
            .iter()
            .map(|(service, n)| {
                format!("{service:<10} {:<12} v1       passing       1234       0   50.0%", format!("{service}-{n}"))
            })
            .collect();
        live(&Live {
            header: &header,
            status: "ferry demo  356s  7120 requests through frontend (20.0/s)  1 error  p50 14ms p90 22ms p99 61ms".to_owned(),
            routes: "routes: none: each request goes to the faster of two instances picked at random (p2c-ewma); at this \
                     light load, mostly the one that answered fastest",
            heading: "SERVICE    INSTANCE     VERSION  HEALTH     SERVED  FAILED   SHARE".to_owned(),
            rows,
            span: "SHARE and catalog by version since the deletion of route/catalog and route/frontend took effect: v1 \
                   100.0%  (of 184)"
                .to_owned(),
            last_request: Some(
                "last request: client -> frontend-1 -> catalog-1 (v1) -> inventory-1,inventory-2,inventory-1".to_owned(),
            ),
            last_error: Some(
                "last error:   503 Service Unavailable: fault_abort: injected by route rule fault of route/catalog v…938275"
                    .to_owned(),
            ),
            keys: Some("keys (then Enter):  c canary  h header-canary  f fault  l lockdown  r reset  ? help  q quit".to_owned()),
            answer: Some(answer),
        })
    }

    #[test]
    fn the_screen_fits_100_by_24_and_wraps_what_it_cannot_show_on_one_row() {
        let frame = fit(&review_screen(&lockdown_answer(), 0), ROWS);
        let rows: Vec<&str> = frame.lines().collect();
        assert!(rows.len() <= ROWS, "{frame}");
        assert!(rows.iter().all(|row| row.chars().count() <= WIDTH), "{frame}");
        // Nothing a newcomer needs is cut: the routes and the SHARE span wrap whole.
        for words in ["mostly the one that answered fastest", "took effect: v1 100.0%", "injected by route rule fault"] {
            assert!(frame.contains(words) || frame.replace("\n  ", " ").contains(words), "{words:?} in:\n{frame}");
        }
        assert!(!rows[..rows.len() - 1].iter().any(|row| row.ends_with('…')), "{frame}");
        // The header and the whole table stay; the answer shows its verdicts.
        assert!(rows[0].starts_with("grpc ") && rows[2].starts_with("ferryctl/curl"), "{frame}");
        for instance in ["inventory-1", "inventory-2", "catalog-1", "catalog-2", "frontend-1", "frontend-2"] {
            assert!(rows.iter().any(|row| row.contains(instance)), "{instance} in:\n{frame}");
        }
        assert!(frame.contains("authorization/catalog enforced by every catalog sidecar (2)"), "{frame}");
        assert!(frame.contains("in force on every sidecar that calls frontend (1)"), "{frame}");
    }

    #[test]
    fn a_crowded_screen_gives_way_least_useful_first_and_still_fits() {
        let parts = review_screen(&lockdown_answer(), 5);
        let frame = fit(&parts, ROWS);
        let rows: Vec<&str> = frame.lines().collect();
        assert!(rows.len() <= ROWS, "{frame}");
        assert!(!frame.contains("every hop sidecar to sidecar"), "the static line goes first:\n{frame}");
        assert!(rows.iter().any(|row| row.contains("frontend-2")), "the table stays:\n{frame}");
        assert!(frame.contains("authorization/catalog enforced"), "the verdict stays:\n{frame}");
    }
}
