//! Cumulative histograms as Prometheus exposes them: `(upper bound, cumulative count)` pairs in
//! ascending bound order, the last bound `+Inf`. The agent sums a service's label sets with
//! [`merge`]; the coordinator sums hosts and reports with it and reads quantiles with
//! [`quantile`], which is what `histogram_quantile(q, sum by (le) (...))` computes.

/// Whether every bound and count is one a histogram can have: bounds non-negative (or `+Inf`),
/// counts finite and non-negative.
pub fn is_valid(buckets: &[(f64, f64)]) -> bool {
    buckets
        .iter()
        .all(|&(bound, count)| !bound.is_nan() && bound >= 0.0 && count.is_finite() && count >= 0.0)
}

/// Sums histograms whose bucket bounds may differ. Each is read at every bound of the union as
/// its count at its own largest bound not above it (never more than it observed there), and
/// counts are kept non-decreasing, so the sum is a cumulative histogram again.
pub fn merge<'a>(histograms: impl IntoIterator<Item = &'a [(f64, f64)]>) -> Vec<(f64, f64)> {
    let histograms: Vec<&[(f64, f64)]> = histograms.into_iter().collect();
    let mut bounds: Vec<f64> = histograms
        .iter()
        .flat_map(|histogram| histogram.iter().map(|&(bound, _)| bound))
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    let mut sums = vec![0.0; bounds.len()];
    for histogram in histograms {
        let mut sorted = histogram.to_vec();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut next, mut count) = (0, 0.0f64);
        for (sum, &bound) in sums.iter_mut().zip(&bounds) {
            while next < sorted.len() && sorted[next].0 <= bound {
                count = count.max(sorted[next].1);
                next += 1;
            }
            *sum += count;
        }
    }
    bounds.into_iter().zip(sums).collect()
}

/// The `q` quantile, interpolating linearly inside the bucket it falls in, as Prometheus does:
/// `None` without observations, with fewer than two buckets, or for `q` outside 0..=1; the
/// highest finite bound when it falls in the `+Inf` bucket.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let observed = buckets.last()?.1;
    if buckets.len() < 2 || observed <= 0.0 || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let rank = q * observed;
    let (mut lower_bound, mut below) = (0.0, 0.0);
    for &(bound, cumulative) in buckets {
        if cumulative >= rank {
            if bound.is_infinite() {
                return Some(lower_bound);
            }
            let inside = cumulative - below;
            if inside <= 0.0 {
                return Some(bound);
            }
            return Some(lower_bound + (bound - lower_bound) * (rank - below) / inside);
        }
        (lower_bound, below) = (bound, cumulative);
    }
    Some(lower_bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: f64 = f64::INFINITY;

    #[test]
    fn quantiles_follow_prometheus_histogram_quantile() {
        assert_eq!(quantile(0.5, &[(10.0, 0.0), (INF, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(10.0, 4.0), (INF, 4.0)]), Some(5.0));
        // Above the highest finite bound: that bound.
        assert_eq!(quantile(0.99, &[(10.0, 1.0), (INF, 100.0)]), Some(10.0));
        assert_eq!(quantile(1.5, &[(10.0, 1.0), (INF, 1.0)]), None);
        // Only +Inf: nothing to interpolate in.
        assert_eq!(quantile(0.5, &[(INF, 10.0)]), None);
    }

    #[test]
    fn merging_different_layouts_stays_cumulative() {
        let a = [(10.0, 5.0), (100.0, 10.0), (INF, 10.0)];
        let b = [(50.0, 2.0), (INF, 4.0)];
        let merged = merge([&a[..], &b[..]]);
        assert_eq!(
            merged,
            vec![(10.0, 5.0), (50.0, 7.0), (100.0, 12.0), (INF, 14.0)]
        );
        assert!(merged.windows(2).all(|pair| pair[0].1 <= pair[1].1));
        assert_eq!(
            merge([&a[..], &a[..]]),
            vec![(10.0, 10.0), (100.0, 20.0), (INF, 20.0)]
        );
        assert!(merge(std::iter::empty()).is_empty());
    }

    #[test]
    fn invalid_values_are_told_apart() {
        assert!(is_valid(&[(0.5, 1.0), (INF, 2.0)]));
        assert!(!is_valid(&[(f64::NAN, 1.0)]));
        assert!(!is_valid(&[(-1.0, 1.0)]));
        assert!(!is_valid(&[(1.0, INF)]));
        assert!(!is_valid(&[(1.0, -2.0)]));
    }
}
