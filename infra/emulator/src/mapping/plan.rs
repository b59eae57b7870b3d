//! The lease plan of a mapping's runners, as pure functions: from what a runner knows (the live
//! runners, the partitions it holds, who holds the others), which partitions it takes and which it
//! hands over. Every runner computes the same fair share, so the partitions spread evenly, and a
//! runner hands at most one over a cycle, so partitions do not bounce.
use std::collections::BTreeMap;

/// Who holds a partition that this runner does not read, as this runner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Nobody live: never leased, released, this runner's own from an earlier life, or held by a
    /// runner whose lease counter has not moved for the failover time. It may be taken.
    Free,
    /// Another runner whose lease is live. `confirmed`: its counter was seen to move (not merely
    /// given the failover time on first sight).
    Other {
        /// The runner's worker id.
        worker: String,
        /// Seen renewing.
        confirmed: bool,
    },
}

/// What to take this cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takes {
    /// The free partitions, in the order to try them (another runner may take one first).
    pub candidates: Vec<String>,
    /// How many of them to take.
    pub want: usize,
    /// The fair share: every partition over the live runners, rounded up.
    pub target: usize,
    /// Partitions held by runners not yet seen renewing: they may still come to this runner, so
    /// it is not idle while any are.
    pub uncertain: usize,
    /// Partitions per other runner.
    pub others: BTreeMap<String, usize>,
}

/// Which partitions this runner takes, given the live runners (`live`, itself included), how many
/// it reads and is not handing over (`held`), and the partitions it could read (`open`: neither
/// its own nor finished, with their parents finished), each with its holder.
pub fn takes(live: usize, held: usize, open: &[(String, Holder)]) -> Takes {
    let mut others: BTreeMap<String, usize> = BTreeMap::new();
    let mut candidates = Vec::new();
    let mut uncertain = 0;
    for (id, holder) in open {
        match holder {
            Holder::Free => candidates.push(id.clone()),
            Holder::Other { worker, confirmed } => {
                uncertain += usize::from(!confirmed);
                *others.entry(worker.clone()).or_default() += 1;
            }
        }
    }
    let total = held + candidates.len() + others.values().sum::<usize>();
    let target = total.div_ceil(live.max(1));
    let want = target.saturating_sub(held).min(candidates.len());
    Takes { candidates, want, target, uncertain, others }
}

/// What this runner does after its takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The partition to hand over, if any (the highest id: the same choice on every runner).
    pub hand_over: Option<String>,
    /// Another runner holds more than its share or two more than this one: it will hand one
    /// over, maybe to this runner, so this runner is not idle yet.
    pub expecting: bool,
}

/// Whether to hand a partition over: this runner reads `mine` (not handing over), some may be
/// `draining` already, it is `short` of its share (it wanted more than it could take: none free,
/// or another runner was first), `live_others` are the other live runners, and `takes` is this
/// cycle's plan. It hands one over when it holds more than
/// the fair share, or two more than another live runner, and nothing is in motion (none draining,
/// none still wanted).
pub fn balance(mine: &[String], draining: bool, short: bool, live_others: &[String], takes: &Takes) -> Balance {
    let n = mine.len();
    let count = |w: &String| takes.others.get(w).copied().unwrap_or(0);
    let expecting = takes.others.values().any(|&o| o > takes.target || o > n + 1);
    let below = live_others.iter().any(|w| count(w) + 1 < n);
    let hand_over = (!draining && !short && (n > takes.target || below)).then(|| mine.iter().max().cloned()).flatten();
    Balance { hand_over, expecting }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(ids: &[&str]) -> Vec<(String, Holder)> {
        ids.iter().map(|id| ((*id).to_owned(), Holder::Free)).collect()
    }

    fn other(id: &str, worker: &str, confirmed: bool) -> (String, Holder) {
        (id.to_owned(), Holder::Other { worker: worker.to_owned(), confirmed })
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_runner_alone_takes_everything() {
        let t = takes(1, 0, &free(&["s0", "s1", "s2", "s3"]));
        assert_eq!((t.want, t.target, t.uncertain), (4, 4, 0));
        assert_eq!(t.candidates, ids(&["s0", "s1", "s2", "s3"]));
        let b = balance(&ids(&["s0", "s1", "s2", "s3"]), false, false, &[], &t);
        assert_eq!(b, Balance { hand_over: None, expecting: false });
    }

    #[test]
    fn a_second_runner_takes_its_share_from_the_free_ones_only() {
        // b sees a holding four of eight, four free: it takes four.
        let mut open = free(&["s4", "s5", "s6", "s7"]);
        open.extend(["s0", "s1", "s2", "s3"].map(|s| other(s, "a", true)));
        let t = takes(2, 0, &open);
        assert_eq!((t.want, t.target), (4, 4));
        assert_eq!(t.candidates, ids(&["s4", "s5", "s6", "s7"]));
    }

    #[test]
    fn a_runner_over_its_share_hands_one_over_a_cycle() {
        // a holds all four; b joined: a's share is two, it hands over the highest id.
        let t = takes(2, 4, &[]);
        assert_eq!((t.want, t.target), (0, 2));
        let mine = ids(&["s0", "s1", "s2", "s3"]);
        let b = balance(&mine, false, false, &ids(&["b"]), &t);
        assert_eq!(b.hand_over.as_deref(), Some("s3"));
        // One already draining: none more this cycle.
        assert_eq!(balance(&mine[..3], true, false, &ids(&["b"]), &t).hand_over, None);
        // At its share: none.
        let t = takes(2, 2, &[other("s2", "b", true), other("s3", "b", true)]);
        assert_eq!(balance(&mine[..2], false, false, &ids(&["b"]), &t).hand_over, None);
    }

    #[test]
    fn two_more_than_another_runner_is_one_too_many() {
        // 5 partitions, 2 runners: the share is 3; with 3 against 2 it is even enough...
        let t = takes(2, 3, &[other("s3", "b", true), other("s4", "b", true)]);
        assert_eq!(balance(&ids(&["s0", "s1", "s2"]), false, false, &ids(&["b"]), &t).hand_over, None);
        // ...but 3 against 1 (b is short by two) hands one over even at the share.
        let t = takes(3, 3, &[other("s3", "b", true), other("s4", "c", true), other("s5", "c", true)]);
        assert_eq!(t.target, 2);
        let b = balance(&ids(&["s0", "s1", "s2"]), false, false, &ids(&["b", "c"]), &t);
        assert_eq!(b.hand_over.as_deref(), Some("s2"));
    }

    #[test]
    fn a_runner_short_of_what_it_wanted_hands_nothing_over() {
        let t = takes(2, 3, &free(&["s3"]));
        let b = balance(&ids(&["s0", "s1", "s2"]), false, true, &ids(&["b"]), &t);
        assert_eq!(b.hand_over, None);
    }

    #[test]
    fn a_runner_waits_for_what_others_will_hand_over() {
        // c holds four of four; a and b are new: each expects one to come.
        let open: Vec<_> = ["s0", "s1", "s2", "s3"].map(|s| other(s, "c", true)).into();
        let t = takes(3, 0, &open);
        assert_eq!((t.want, t.target), (0, 2));
        assert!(balance(&[], false, false, &ids(&["b", "c"]), &t).expecting);
        // Shares met: nothing expected.
        let t = takes(2, 2, &[other("s2", "c", true), other("s3", "c", true)]);
        assert!(!balance(&ids(&["s0", "s1"]), false, false, &ids(&["c"]), &t).expecting);
    }

    #[test]
    fn leases_of_runners_not_seen_renewing_are_uncertain() {
        let t = takes(2, 0, &[other("s0", "x", false), other("s1", "x", true)]);
        assert_eq!(t.uncertain, 1);
    }

    #[test]
    fn every_partition_is_read_once_the_runners_settle() {
        // Any number of partitions and runners: run the plan round by round, as the runners do,
        // until nothing moves; then every partition has one reader and shares differ by at most 1.
        for partitions in 1..12usize {
            for runners in 1..5usize {
                let names: Vec<String> = (0..runners).map(|r| format!("w{r}")).collect();
                let mut owner: Vec<Option<usize>> = vec![None; partitions];
                for _round in 0..(4 * partitions + 4) {
                    for r in 0..runners {
                        let mine: Vec<String> =
                            (0..partitions).filter(|&p| owner[p] == Some(r)).map(|p| format!("s{p:02}")).collect();
                        let open: Vec<(String, Holder)> = (0..partitions)
                            .filter(|&p| owner[p] != Some(r))
                            .map(|p| {
                                let h = match owner[p] {
                                    None => Holder::Free,
                                    Some(o) => Holder::Other { worker: names[o].clone(), confirmed: true },
                                };
                                (format!("s{p:02}"), h)
                            })
                            .collect();
                        let t = takes(runners, mine.len(), &open);
                        for id in t.candidates.iter().take(t.want) {
                            let p: usize = id[1..].parse().unwrap();
                            owner[p] = Some(r);
                        }
                        let mine: Vec<String> =
                            (0..partitions).filter(|&p| owner[p] == Some(r)).map(|p| format!("s{p:02}")).collect();
                        let others: Vec<String> = names.iter().filter(|n| **n != names[r]).cloned().collect();
                        if let Some(id) = balance(&mine, false, false, &others, &t).hand_over {
                            let p: usize = id[1..].parse().unwrap();
                            owner[p] = None;
                        }
                    }
                }
                assert!(owner.iter().all(Option::is_some), "{partitions} over {runners}: {owner:?}");
                let counts: Vec<usize> =
                    (0..runners).map(|r| owner.iter().filter(|o| **o == Some(r)).count()).collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(hi - lo <= 1, "{partitions} over {runners}: {counts:?}");
            }
        }
    }
}
