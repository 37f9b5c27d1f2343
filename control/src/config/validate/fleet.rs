//! `[fleet]`: the store replicas share decisions through.

use super::*;
use crate::config::raw::RawFleet;
use crate::config::FleetSettings;

impl Validator<'_> {
    pub(super) fn fleet(&mut self, f: &Spanned<RawFleet>) -> Option<FleetSettings> {
        let span = f.span();
        let f = f.get_ref();
        let before = self.errors.len();
        match &f.store {
            Some(s) if s.get_ref() == "etcd" => {}
            Some(s) => self.err(
                s.span(),
                format!(
                    "[fleet] store {:?} is not supported: the only store is \"etcd\" (etcd v3)",
                    s.get_ref()
                ),
            ),
            None => self.err(span.clone(), "[fleet] needs store = \"etcd\""),
        }
        let mut endpoints = Vec::new();
        match &f.endpoints {
            Some(list) if list.get_ref().is_empty() => self.err(
                list.span(),
                "[fleet] endpoints is empty: name the etcd client URLs",
            ),
            Some(list) => {
                for e in list.get_ref() {
                    let url = e.get_ref().trim_end_matches('/');
                    let rest = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"));
                    match rest {
                        Some(hp) if valid_host_port(hp) => endpoints.push(url.to_string()),
                        _ => self.err(
                            e.span(),
                            format!(
                                "fleet endpoint {:?} is not http://host:port or https://host:port",
                                e.get_ref()
                            ),
                        ),
                    }
                }
                let tls = endpoints
                    .iter()
                    .filter(|e| e.starts_with("https://"))
                    .count();
                if tls != 0 && tls != endpoints.len() {
                    self.err(
                        list.span(),
                        "[fleet] endpoints mix http:// and https://: the store is reached one way",
                    );
                }
            }
            None => self.err(
                span.clone(),
                "[fleet] needs endpoints = [\"http://host:2379\", ...]",
            ),
        }
        let name = match &f.name {
            Some(n) if valid_fleet_name(n.get_ref()) => n.get_ref().clone(),
            Some(n) => {
                self.err(
                    n.span(),
                    format!("[fleet] name {:?} must be 1-63 of [a-z0-9_.-]", n.get_ref()),
                );
                String::new()
            }
            None => {
                self.err(
                    span.clone(),
                    "[fleet] needs a name (replicas with the same name share decisions)",
                );
                String::new()
            }
        };
        let replica = f.replica.as_ref().and_then(|r| {
            let ok = valid_fleet_name(r.get_ref());
            if !ok {
                self.err(
                    r.span(),
                    format!(
                        "[fleet] replica {:?} must be 1-63 of [a-z0-9_.-]",
                        r.get_ref()
                    ),
                );
            }
            ok.then(|| r.get_ref().clone())
        });
        let tls = endpoints.iter().any(|e| e.starts_with("https://"));
        let ca_file = f.ca_file.as_ref().map(|c| {
            if !tls {
                self.err(
                    c.span(),
                    "ca_file is set but the fleet endpoints are http://",
                );
            }
            self.path(c)
        });
        if let (Some(c), false) = (&f.cert_file, tls) {
            self.err(
                c.span(),
                "cert_file is set but the fleet endpoints are http://",
            );
        }
        let client_cert = self.client_cert(f.cert_file.as_ref(), f.key_file.as_ref());
        let pool = f.pool.as_ref().is_none_or(|p| *p.get_ref());
        let seats = self.int_in(f.seats.as_ref(), 1..=1000, 16, "[fleet] seats");
        if !pool {
            if let Some(s) = &f.seats {
                self.warn(
                    s.span(),
                    "[fleet] seats only matters when the evidence is pooled (pool = true)",
                );
            }
        }
        let keep_evidence = self.duration(f.keep_evidence.as_ref(), crate::fleet::KEEP_EVIDENCE);
        if let (Some(k), false) = (&f.keep_evidence, pool) {
            self.warn(
                k.span(),
                "[fleet] keep_evidence only matters when the evidence is pooled (pool = true)",
            );
        }
        (self.errors.len() == before).then_some(FleetSettings {
            endpoints,
            name,
            replica,
            ca_file,
            client_cert,
            seats: if pool { seats as u32 } else { 0 },
            keep_evidence,
        })
    }
}
