//! `[route.judge]`: limits, settings and the webhook.

use super::*;

impl Validator<'_> {
    fn webhook(&mut self, j: &RawJudge) -> Option<Webhook> {
        let ca_file = j.webhook_ca_file.as_ref().map(|f| (f.span(), self.path(f)));
        let format = j.webhook_format.as_ref().map(|f| {
            let parsed = WebhookFormat::parse(f.get_ref());
            if parsed.is_none() {
                self.err(
                    f.span(),
                    format!(
                        "webhook_format {:?} is not \"json\", \"slack\" or \"teams\"",
                        f.get_ref()
                    ),
                );
            }
            (f.span(), parsed.unwrap_or_default())
        });
        let Some(w) = &j.webhook else {
            if let Some((span, _)) = ca_file {
                self.err(span, "webhook_ca_file is set but there is no webhook");
            }
            if let Some((span, _)) = format {
                self.err(span, "webhook_format is set but there is no webhook");
            }
            return None;
        };
        let mut hook = self.http_target(w, ca_file, "webhook")?;
        hook.format = format.map(|(_, f)| f).unwrap_or_default();
        Some(hook)
    }

    /// An http[s] URL veer sends requests to (`key`: its config key, for
    /// messages), with the CA file its https certificate is verified
    /// against (`{key}_ca_file`).
    pub(super) fn http_target(
        &mut self,
        w: &Spanned<String>,
        ca_file: Option<(std::ops::Range<usize>, PathBuf)>,
        key: &str,
    ) -> Option<Webhook> {
        let Some(mut hook) = Webhook::parse(w.get_ref()) else {
            self.err(
                w.span(),
                format!(
                    "{key} {:?} is not an http[s]://host[:port][/path] URL without credentials",
                    crate::config::redact_url(w.get_ref())
                ),
            );
            return None;
        };
        if let Some((span, path)) = ca_file {
            if !hook.tls {
                self.err(
                    span,
                    format!("{key}_ca_file applies only to an https:// {key} URL"),
                );
                return None;
            }
            match std::fs::read_to_string(&path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => hook.ca_file = Some(path),
                Ok(_) => {
                    self.err(
                        span,
                        format!("{key}_ca_file {}: no PEM certificate in it", path.display()),
                    );
                    return None;
                }
                Err(e) => {
                    self.err(span, format!("{key}_ca_file {}: {e}", path.display()));
                    return None;
                }
            }
        }
        Some(hook)
    }

    /// `[route.judge] warmup`: a duration that may be zero, at most 10 minutes.
    fn warmup(&mut self, s: Option<&Spanned<String>>) -> Duration {
        let Some(s) = s else {
            return defaults::WARMUP;
        };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d > Duration::from_secs(600) => {
                self.err(s.span(), "warmup must be at most 10m: a longer one leaves a slow canary untested for too long");
                defaults::WARMUP
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    s.span(),
                    format!(
                        "invalid duration {:?}: {e} (write a number with a unit, like \"0s\" or \"30s\")",
                        s.get_ref()
                    ),
                );
                defaults::WARMUP
            }
        }
    }

    pub(super) fn fraction(
        &mut self,
        s: Option<&Spanned<f64>>,
        lo_exclusive: f64,
        hi: f64,
        what: &str,
    ) -> Option<f64> {
        let s = s?;
        let v = *s.get_ref();
        if v > lo_exclusive && v <= hi {
            Some(v)
        } else {
            self.err(
                s.span(),
                format!("{what} must be greater than {lo_exclusive} and at most {hi}, got {v}"),
            );
            None
        }
    }

    fn quantile_map(
        &mut self,
        m: Option<&Spanned<std::collections::BTreeMap<String, Spanned<f64>>>>,
        lo_exclusive: f64,
        what: &str,
    ) -> Vec<(Quantile, f64)> {
        let mut out = Vec::new();
        let Some(m) = m else { return out };
        for (k, v) in m.get_ref() {
            let Some(q) = Quantile::from_key(k) else {
                self.err(
                    m.span(),
                    format!("{what}: unknown quantile {k:?} (use p50, p90, p95, p99 or p999)"),
                );
                continue;
            };
            if v.get_ref().partial_cmp(&lo_exclusive) != Some(std::cmp::Ordering::Greater)
                || !v.get_ref().is_finite()
            {
                self.err(
                    v.span(),
                    format!("{what}.{k} must be greater than {lo_exclusive}"),
                );
                continue;
            }
            out.push((q, *v.get_ref()));
        }
        out.sort_by_key(|(q, _)| *q);
        out
    }

    pub(super) fn judge(&mut self, j: Option<&RawJudge>) -> JudgeSettings {
        let default = RawJudge::default();
        let j = j.unwrap_or(&default);
        let mode = match j.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => JudgeMode::Enforce,
            Some(("observe", _)) => JudgeMode::Observe,
            Some(("off", _)) => JudgeMode::Off,
            Some((other, span)) => {
                self.err(
                    span,
                    format!("judge mode {other:?} is not one of \"enforce\", \"observe\", \"off\""),
                );
                JudgeMode::Enforce
            }
        };
        let interval = self.duration(j.interval.as_ref(), defaults::JUDGE_INTERVAL);
        let window = self.duration(j.window.as_ref(), defaults::JUDGE_WINDOW);
        if interval > window {
            let span = j.interval.as_ref().map_or(0..0, |s| s.span());
            self.err(span, "judge interval must not exceed the window");
        }
        if window > Duration::from_secs(3600) {
            let span = j.window.as_ref().map_or(0..0, |s| s.span());
            self.err(span, "judge window must be at most 1h");
        }
        let min_requests = self.int_in(
            j.min_requests.as_ref(),
            1..=1_000_000_000,
            defaults::MIN_REQUESTS as i64,
            "min_requests",
        ) as u64;
        JudgeSettings {
            mode,
            interval,
            window,
            min_requests,
            max_error_rate: self.fraction(j.max_error_rate.as_ref(), 0.0, 1.0, "max_error_rate"),
            max_error_rate_ratio: self.fraction(
                j.max_error_rate_ratio.as_ref(),
                1.0,
                1e6,
                "max_error_rate_ratio",
            ),
            max_latency_ms: self.quantile_map(j.max_latency_ms.as_ref(), 0.0, "max_latency_ms"),
            max_latency_ratio: self.quantile_map(
                j.max_latency_ratio.as_ref(),
                1.0,
                "max_latency_ratio",
            ),
            false_revert_rate: self
                .fraction(j.false_revert_rate.as_ref(), 0.0, 0.5, "false_revert_rate")
                .unwrap_or(defaults::FALSE_REVERT_RATE),
            margin: match &j.margin {
                Some(m) if !(1.0..=10.0).contains(m.get_ref()) => {
                    self.err(
                        m.span(),
                        format!("margin must be between 1 and 10, got {}", m.get_ref()),
                    );
                    1.0
                }
                Some(m) => *m.get_ref(),
                None => 1.0,
            },
            watch: self.duration(j.watch.as_ref(), defaults::WATCH),
            warmup: self.warmup(j.warmup.as_ref()),
            blue_green: false,
            mirrored: false,
            webhook: self.webhook(j),
            slo: match &j.slo {
                Some(v) if !(0.5..1.0).contains(v.get_ref()) => {
                    self.err(v.span(), format!("slo must be an availability objective between 0.5 and 1 (exclusive), like 0.999; got {}", v.get_ref()));
                    None
                }
                Some(v) => Some(*v.get_ref()),
                None => None,
            },
            fleet_seats: 0,
            one_vote_per_client: j.one_vote_per_client.as_ref().is_none_or(|v| *v.get_ref()),
        }
    }
}
