//! Thinking spans (`<think>` … `</think>`, Qwen3 and the DeepSeek-R1 distills): which generated tokens are
//! reasoning, and the thinking budget that closes a span by emitting the end-of-thinking tokens itself.
//!
//! A model has a span when its vocabulary has both markers as single tokens. A sequence starts inside one when
//! its prompt opened a span it did not close (R1 templates end the generation prompt with `<think>\n`); the model
//! opens one by generating `<think>`. The markers themselves count as reasoning and are streamed by id with no
//! text, so a client shows the reasoning without them.

use crate::model::Tokenizer;

/// The markers of a model's thinking span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThinkMarkers {
    pub open: u32,
    pub close: u32,
    /// What the engine emits when a budget closes the span: `</think>` and the blank line templates put after it.
    pub conclude: Vec<u32>,
}

impl ThinkMarkers {
    /// The markers, when the vocabulary has `<think>` and `</think>` as single tokens.
    pub fn of(tok: &Tokenizer) -> Option<Self> {
        let (open, close) = (tok.token_id("<think>")?, tok.token_id("</think>")?);
        let mut conclude = vec![close];
        conclude.extend(tok.encode("\n\n", false).unwrap_or_default());
        Some(ThinkMarkers { open, close, conclude })
    }

    /// Whether `prompt` leaves a span open: its last `<think>` after its last `</think>`.
    pub fn open_after(&self, prompt: &[u32]) -> bool {
        let last = |id: u32| prompt.iter().rposition(|&t| t == id);
        match (last(self.open), last(self.close)) {
            (Some(o), Some(c)) => o > c,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// A request's thinking: the model's markers, whether the prompt left a span open, and the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thinking {
    pub markers: ThinkMarkers,
    pub open_in_prompt: bool,
    /// Reasoning tokens the model may generate before the engine closes the span (`None`: no limit).
    pub budget: Option<usize>,
}

/// A sequence's place in its spans.
#[derive(Clone, Debug, Default)]
pub struct ThinkState {
    pub inside: bool,
    pub reasoning_tokens: usize,
    /// Tokens to emit instead of sampling (the end of a span the budget closed).
    pub forced: std::collections::VecDeque<u32>,
    pub budget_reached: bool,
    /// The memory budget closed the span (`on_memory_pressure = "conclude"`).
    pub concluded: bool,
}

impl ThinkState {
    pub fn new(t: Option<&Thinking>) -> Self {
        ThinkState {
            inside: t.is_some_and(|t| t.open_in_prompt),
            ..Default::default()
        }
    }

    /// Queue the end of the open span in place of sampling; false when there is no span to close (or its end is
    /// already queued).
    fn close_span(&mut self, t: &Thinking) -> bool {
        let closing = self.inside && self.forced.is_empty();
        if closing {
            self.forced.extend(&t.markers.conclude);
        }
        closing
    }

    /// Before choosing the next token: the token the engine emits itself, if the budget is spent.
    pub fn forced_next(&mut self, t: Option<&Thinking>) -> Option<u32> {
        if let Some(t) = t {
            let spent = t.budget.is_some_and(|b| self.reasoning_tokens >= b);
            if spent && !self.budget_reached && self.close_span(t) {
                self.budget_reached = true;
            }
        }
        self.forced.pop_front()
    }

    /// Close the span at the next token (the memory budget is running out). Returns whether it did: only inside a
    /// span. Called before every step while the room is short, so a span the model opens again is closed again:
    /// the room left is the answer's.
    pub fn conclude(&mut self, t: Option<&Thinking>) -> bool {
        let closed = t.is_some_and(|t| self.close_span(t));
        self.concluded |= closed;
        closed
    }

    /// After choosing `tok`: (whether it is reasoning, whether it is a marker).
    pub fn observe(&mut self, t: Option<&Thinking>, tok: u32) -> (bool, bool) {
        let Some(t) = t else {
            return (false, false);
        };
        let (reasoning, marker) = if tok == t.markers.open {
            self.inside = true;
            (true, true)
        } else if tok == t.markers.close && self.inside {
            self.inside = false;
            (true, true)
        } else {
            (self.inside, false)
        };
        if reasoning {
            self.reasoning_tokens += 1;
        }
        (reasoning, marker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thinking(budget: Option<usize>, open: bool) -> Thinking {
        Thinking {
            markers: ThinkMarkers {
                open: 10,
                close: 11,
                conclude: vec![11, 5],
            },
            open_in_prompt: open,
            budget,
        }
    }

    #[test]
    fn a_prompt_leaves_a_span_open_only_after_its_last_open_marker() {
        let m = thinking(None, false).markers;
        assert!(m.open_after(&[1, 10, 2]));
        assert!(!m.open_after(&[1, 10, 2, 11, 3]));
        assert!(m.open_after(&[10, 11, 10]));
        assert!(!m.open_after(&[1, 2]));
    }

    #[test]
    fn the_budget_closes_the_span_after_that_many_reasoning_tokens() {
        let t = thinking(Some(3), true);
        let mut s = ThinkState::new(Some(&t));
        let mut out = Vec::new();
        for sampled in [7, 8, 9, 7, 8, 9] {
            let tok = s.forced_next(Some(&t)).unwrap_or(sampled);
            out.push((tok, s.observe(Some(&t), tok)));
        }
        // three sampled reasoning tokens, then `</think>` and the blank line forced, then the answer
        assert_eq!(
            out,
            [
                (7, (true, false)),
                (8, (true, false)),
                (9, (true, false)),
                (11, (true, true)),
                (5, (false, false)),
                (9, (false, false))
            ]
        );
        assert!(s.budget_reached && !s.inside);
        assert_eq!(s.reasoning_tokens, 4, "the closing marker counts as reasoning");
    }

    #[test]
    fn concluding_closes_every_span_opened_while_the_room_is_short() {
        let t = thinking(None, true);
        let mut s = ThinkState::new(Some(&t));
        let mut out = Vec::new();
        for sampled in [7, 8, 10, 9] {
            s.conclude(Some(&t));
            let tok = s.forced_next(Some(&t)).unwrap_or(sampled);
            out.push(tok);
            s.observe(Some(&t), tok);
        }
        // closed at once; the model reopens with 10, which is closed again at the next step
        assert_eq!(out, [11, 5, 10, 11]);
        assert!(s.concluded && !s.inside);
    }

    #[test]
    fn a_model_that_closes_its_span_itself_is_not_cut() {
        let t = thinking(Some(5), false);
        let mut s = ThinkState::new(Some(&t));
        for tok in [10, 1, 11, 2, 3, 4, 5, 6] {
            assert_eq!(s.forced_next(Some(&t)), None);
            s.observe(Some(&t), tok);
        }
        assert!(!s.budget_reached);
        assert_eq!(s.reasoning_tokens, 3);
    }
}
