//! Stop strings for streamed text: hold back what could still become a stop string, cut at one.

/// Streams text through, holding back any tail that could start a stop string; stops at one.
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
    done: bool,
}

impl StopFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new(), done: false }
    }

    /// Returns the text safe to emit now and whether a stop string was reached.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.done {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let emit = self.held[..at].to_string();
            self.held.clear();
            self.done = true;
            return (emit, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).filter(|&k| s.is_char_boundary(k)).map(move |k| &s[..k]))
            .filter(|pre| self.held.ends_with(pre))
            .map(|pre| pre.len())
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let emit = self.held[..cut].to_string();
        self.held.drain(..cut);
        (emit, false)
    }

    /// What is still held when generation ends without a stop.
    pub fn finish(&mut self) -> String {
        if self.done {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_filter_holds_prefixes_and_cuts_at_stop() {
        let mut f = StopFilter::new(vec!["END".into()]);
        assert_eq!(f.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(f.push("N"), (String::new(), false));
        assert_eq!(f.push("X more"), ("ENX more".to_string(), false));
        assert_eq!(f.push(" and END tail"), (" and ".to_string(), true));
        assert_eq!(f.finish(), "");
        let mut g = StopFilter::new(vec![]);
        assert_eq!(g.push("abc"), ("abc".to_string(), false));
    }
}
