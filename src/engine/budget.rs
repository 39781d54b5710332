//! The budget policy as pure functions of plain numbers (mistral.rs keeps admission the same way): how long a
//! request's cache may grow, which horizon admission checks, who gives way when the floors do not fit, and how
//! the budget is split over the sequences that stay. The engine loop (`scheduler.rs`) only sequences these calls;
//! the stores turn each sequence's share into per-layer widths.

/// Tokens a request's cache may hold over its life: prompt plus `max_tokens`, capped at the context.
pub fn max_len(prompt_tokens: usize, max_tokens: usize, context: usize) -> usize {
    (prompt_tokens + max_tokens).min(context)
}

/// Tokens a new sequence's first step stores: admission checks that its floor for these fits the budget.
pub fn first_step_tokens(prompt_tokens: usize, prefill_chunk: usize) -> usize {
    prompt_tokens.min(prefill_chunk.max(1))
}

/// What a sequence would take with nothing binding: every token it may hold at 16 bits, and never less than
/// its floor.
pub fn demand(floor: usize, f16_token_bytes: usize, max_len: usize) -> usize {
    floor.max(f16_token_bytes * max_len)
}

/// Priority 100 weighs 4× a priority-0 sequence, −100 a quarter.
pub fn weight(priority: i32) -> f64 {
    (priority as f64 / 50.0).exp2()
}

/// Which live sequence gives way when the floors do not fit: the lowest priority, the newest among equals.
/// `live`: (index, priority, arrival); `None` when there is none.
pub fn victim<T: Ord>(live: impl IntoIterator<Item = (usize, i32, T)>) -> Option<usize> {
    live.into_iter()
        .min_by(|a, b| a.1.cmp(&b.1).then_with(|| b.2.cmp(&a.2)))
        .map(|(i, _, _)| i)
}

/// Whether `need` more bytes fit `total` beside `committed` (what running and preempted sequences hold a
/// claim to). Admission and resumption both ask this; the first request that does not fit waits, so a large old
/// request is not overtaken forever.
pub fn fits(committed: usize, need: usize, total: usize) -> bool {
    committed.checked_add(need).is_some_and(|t| t <= total)
}

/// Split `total` over sequences: each gets its floor, then the rest by weight up to its demand (water-filling).
pub fn water_fill(total: usize, floors: &[usize], demands: &[usize], weights: &[f64]) -> Vec<usize> {
    let mut alloc = floors.to_vec();
    let mut rest = total.saturating_sub(floors.iter().sum());
    let mut open: Vec<usize> = (0..floors.len()).filter(|&i| demands[i] > alloc[i]).collect();
    while rest > 0 && !open.is_empty() {
        let wsum: f64 = open.iter().map(|&i| weights[i]).sum();
        let mut used = 0;
        for &i in &open {
            let give = ((rest as f64 * weights[i] / wsum) as usize).min(demands[i] - alloc[i]);
            alloc[i] += give;
            used += give;
        }
        if used == 0 {
            break;
        }
        rest -= used;
        open.retain(|&i| demands[i] > alloc[i]);
    }
    alloc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_and_horizons() {
        assert_eq!(max_len(100, 50, 2048), 150);
        assert_eq!(max_len(2000, 500, 2048), 2048);
        assert_eq!(first_step_tokens(1000, 256), 256);
        assert_eq!(first_step_tokens(10, 256), 10);
        assert_eq!(first_step_tokens(10, 0), 1, "a zero chunk still stores one token");
        assert_eq!(demand(5_000, 100, 30), 5_000, "never below the floor");
        assert_eq!(demand(1_000, 100, 30), 3_000);
    }

    #[test]
    fn weights_double_every_fifty_priority_points() {
        assert_eq!(weight(0), 1.0);
        assert_eq!(weight(100), 4.0);
        assert_eq!(weight(-100), 0.25);
        assert!(weight(50) > weight(49));
    }

    #[test]
    fn the_victim_is_the_lowest_priority_then_the_newest() {
        assert_eq!(victim([(0, 0, 1), (1, -5, 2), (2, -5, 3), (3, 10, 4)]), Some(2));
        assert_eq!(victim([(7, 3, 9)]), Some(7));
        assert_eq!(victim(Vec::<(usize, i32, u32)>::new()), None);
    }

    #[test]
    fn fitting_is_inclusive_and_never_overflows() {
        assert!(fits(40, 60, 100));
        assert!(!fits(40, 61, 100));
        assert!(!fits(120, 0, 100), "over budget already: nothing more starts");
        assert!(!fits(usize::MAX - 1, 5, usize::MAX));
    }

    #[test]
    fn water_filling_gives_floors_first_then_the_rest_by_weight_up_to_demand() {
        // everything fits: each gets its demand
        assert_eq!(water_fill(1000, &[10, 10], &[100, 200], &[1.0, 1.0]), vec![100, 200]);
        // rest split by weight
        let a = water_fill(410, &[5, 5], &[1000, 1000], &[1.0, 4.0]);
        assert_eq!(a.iter().sum::<usize>(), 410);
        assert_eq!(a, vec![85, 325]);
        // a capped sequence's unused share flows to the others
        let a = water_fill(300, &[0, 0, 0], &[50, 1000, 1000], &[1.0, 1.0, 1.0]);
        assert_eq!(a[0], 50);
        assert_eq!(a[1] + a[2], 250);
        // below the floors: floors are kept (the caller preempts first), nothing more is given
        assert_eq!(water_fill(10, &[20, 20], &[50, 50], &[1.0, 1.0]), vec![20, 20]);
        assert!(water_fill(0, &[], &[], &[]).is_empty());
    }
}
