//! Stop strings over streamed text. Text that is a prefix of some stop string is held back until it either
//! completes the stop string (then it and everything after are dropped) or can no longer match.

#[derive(Debug, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    held: String,
}

/// Result of feeding one piece of text.
#[derive(Debug, PartialEq, Eq)]
pub struct StopFeed {
    /// Text safe to emit now.
    pub emit: String,
    /// The stop string that matched, if any (generation ends).
    pub matched: Option<String>,
}

impl StopChecker {
    pub fn new(stops: Vec<String>) -> Self {
        StopChecker {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn feed(&mut self, piece: &str) -> StopFeed {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return StopFeed {
                emit: std::mem::take(&mut self.held),
                matched: None,
            };
        }
        // Earliest complete match wins.
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s.clone())))
            .min_by_key(|(i, _)| *i);
        if let Some((i, s)) = hit {
            let emit = self.held[..i].to_string();
            self.held.clear();
            return StopFeed { emit, matched: Some(s) };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices() {
            let tail = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
                break;
            }
        }
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopFeed { emit, matched: None }
    }

    /// End of generation without a match: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_partial_matches_and_cuts_at_the_stop() {
        let mut s = StopChecker::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.feed("hello E").emit, "hello ");
        assert_eq!(s.feed("N").emit, "");
        let f = s.feed("Dx");
        assert_eq!(
            f,
            StopFeed {
                emit: String::new(),
                matched: Some("END".into())
            }
        );
        let mut s = StopChecker::new(vec!["END".into()]);
        assert_eq!(s.feed("En").emit, "En");
        assert_eq!(s.feed("dE").emit, "d");
        assert_eq!(s.finish(), "E");
        let mut s = StopChecker::new(vec![]);
        assert_eq!(s.feed("abc").emit, "abc");
    }
}
