//! Text from outside — the API's answers, server headers, files, the state file — on its way to
//! a log record, systemd's notify socket, `status`, `doctor` or the metrics file: one line, no
//! control characters, bounded. Data, never structure: a newline in a problem detail must not
//! become a second `WATCHDOG=` assignment or a forged log line, and an escape sequence must not
//! reach an operator's terminal.

/// `s` as one printable line of at most `max` characters (`…` appended when cut). Control
/// characters (C0, DEL, C1), line and paragraph separators and the bidirectional overrides are
/// written as Rust escapes (`\n`, `\u{1b}`, `\u{2028}`), so what was there stays visible.
pub fn one_line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max * 4));
    for (count, c) in s.chars().enumerate() {
        if count >= max {
            out.push('…');
            return out;
        }
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// True for characters that would break a line, a notify datagram or a terminal.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_becomes_visible_data() {
        assert_eq!(
            one_line("plain text, ünïcode ✓", 100),
            "plain text, ünïcode ✓"
        );
        assert_eq!(
            one_line("bad\nWATCHDOG=trigger\r\nMAINPID=1", 100),
            "bad\\nWATCHDOG=trigger\\r\\nMAINPID=1"
        );
        assert_eq!(one_line("\x1b[31mred\x07", 100), "\\u{1b}[31mred\\u{7}");
        assert_eq!(
            one_line("a\u{2028}b\u{85}c\u{202e}d", 100),
            "a\\u{2028}b\\u{85}c\\u{202e}d"
        );
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("", 3), "");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Whatever comes in: one line, nothing a terminal or a notify parser acts on, bounded.
        #[test]
        fn any_text_is_one_bounded_printable_line(s in "\\PC*|[\\x00-\\x1f\\x7f-\\u{9f}\\u{2028}\\u{202e}a=\n]*", max in 1usize..300) {
            let t = one_line(&s, max);
            proptest::prop_assert!(!t.chars().any(needs_escape), "{t:?}");
            // Each kept character is at most 10 escaped ones ("\u{10ffff}").
            proptest::prop_assert!(t.chars().count() <= max * 10 + 1);
            if !s.chars().any(needs_escape) && s.chars().count() <= max {
                proptest::prop_assert_eq!(t, s);
            }
        }
    }
}
