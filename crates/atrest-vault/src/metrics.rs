//! Prometheus text metrics: request counts by operation and status,
//! latency sums, audit failures, and a few gauges from the state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), (u64, f64)>>,
    audit_failures: AtomicU64,
}

impl Metrics {
    pub fn record(&self, op: &str, status: u16, d: Duration) {
        let mut m = self.requests.lock().expect("lock");
        let e = m.entry((op.to_string(), status)).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += d.as_secs_f64();
    }
    pub fn audit_failure(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }
    pub fn render(&self, app: &crate::server::App) -> String {
        let mut out = String::new();
        out.push_str("# HELP atrest_vault_requests_total Requests by operation and HTTP status.\n");
        out.push_str("# TYPE atrest_vault_requests_total counter\n");
        let m = self.requests.lock().expect("lock");
        for ((op, st), (n, _)) in m.iter() {
            out.push_str(&format!(
                "atrest_vault_requests_total{{operation=\"{op}\",status=\"{st}\"}} {n}\n"
            ));
        }
        out.push_str("# HELP atrest_vault_request_seconds_sum Total time spent per operation.\n");
        out.push_str("# TYPE atrest_vault_request_seconds_sum counter\n");
        for ((op, st), (_, s)) in m.iter() {
            out.push_str(&format!(
                "atrest_vault_request_seconds_sum{{operation=\"{op}\",status=\"{st}\"}} {s:.6}\n"
            ));
        }
        drop(m);
        out.push_str("# TYPE atrest_vault_audit_failures_total counter\n");
        out.push_str(&format!(
            "atrest_vault_audit_failures_total {}\n",
            self.audit_failures.load(Ordering::Relaxed)
        ));
        let snap = app.store.snapshot();
        let deleted = snap.keys.values().filter(|k| k.is_deleted()).count();
        out.push_str("# TYPE atrest_vault_keys gauge\n");
        out.push_str(&format!(
            "atrest_vault_keys{{state=\"active\"}} {}\n",
            snap.keys.len() - deleted
        ));
        out.push_str(&format!(
            "atrest_vault_keys{{state=\"deleted\"}} {deleted}\n"
        ));
        out.push_str("# TYPE atrest_vault_identities gauge\n");
        out.push_str(&format!(
            "atrest_vault_identities {}\n",
            snap.identities.len()
        ));
        out.push_str("# TYPE atrest_vault_audit_healthy gauge\n");
        out.push_str(&format!(
            "atrest_vault_audit_healthy {}\n",
            u8::from(app.audit.failure().is_none())
        ));
        out
    }
}
