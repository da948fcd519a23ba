//! The DAG's algorithms: cycles (reported as a path of stage names) and the
//! run order.
//!
//! Rules: the order is deterministic — Kahn's algorithm always takes the
//! lowest (file-order) ready stage — so runs, `status` and `dag` list stages
//! the same way every time.

use super::*;

/// A cycle as stage indexes, if the graph has one.
pub(super) fn find_cycle(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    for scc in petgraph::algo::tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let set: HashSet<NodeIndex> = scc.iter().copied().collect();
        // Walk inside the SCC from its smallest node until a node repeats.
        let start = *scc.iter().min_by_key(|n| graph[**n]).unwrap();
        let mut path = vec![start];
        let mut pos: HashMap<NodeIndex, usize> = HashMap::from([(start, 0)]);
        let mut cur = start;
        loop {
            let mut next: Vec<NodeIndex> = graph.neighbors(cur).filter(|n| set.contains(n)).collect();
            next.sort_by_key(|n| graph[*n]);
            let n = next[0];
            if let Some(&p) = pos.get(&n) {
                return Some(path[p..].iter().map(|n| graph[*n]).collect());
            }
            pos.insert(n, path.len());
            path.push(n);
            cur = n;
        }
    }
    None
}

/// Kahn's algorithm, always taking the lowest (file-order) ready stage.
pub(super) fn topo_order(graph: &DiGraph<usize, ()>, n: usize) -> Vec<usize> {
    let mut indeg = vec![0usize; n];
    for e in graph.raw_edges() {
        indeg[graph[e.target()]] += 1;
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(&i) = ready.iter().next() {
        ready.remove(&i);
        order.push(i);
        for m in graph.neighbors(NodeIndex::new(i)) {
            let j = graph[m];
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    order
}
