//! Following a run's events with progress bars, timing each iteration's stages.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::report::{iteration_status_name, status_name};

use crate::client::explain;

/// Follows a run with progress bars (or silently) until it ends; returns the run then.
pub async fn watch(
    client: &mut TrainerServiceClient<Channel>,
    run_id: &str,
    bars: bool,
) -> Result<pb::Run> {
    Ok(watch_timed(client, run_id, bars).await?.0)
}

/// When this watcher first saw each iteration reach each status.
#[derive(Debug, Default, Clone)]
pub struct StatusTimes(BTreeMap<(u32, i32), std::time::Instant>);

impl StatusTimes {
    fn saw(&mut self, iteration: u32, status: i32) {
        self.0
            .entry((iteration, status))
            .or_insert_with(std::time::Instant::now);
    }

    /// Seconds iteration `k` took from status `from` to status `to`, if both were seen.
    pub fn seconds(
        &self,
        k: u32,
        from: pb::IterationStatus,
        to: pb::IterationStatus,
    ) -> Option<f64> {
        let a = self.0.get(&(k, from as i32))?;
        let b = self.0.get(&(k, to as i32))?;
        Some(b.saturating_duration_since(*a).as_secs_f64())
    }

    /// The iterations seen, in order.
    pub fn iterations(&self) -> std::collections::BTreeSet<u32> {
        self.0.keys().map(|(k, _)| *k).collect()
    }
}

/// [`watch`], also timing each iteration's status changes as they are seen.
pub async fn watch_timed(
    client: &mut TrainerServiceClient<Channel>,
    run_id: &str,
    bars: bool,
) -> Result<(pb::Run, StatusTimes)> {
    let mut times = StatusTimes::default();
    let mut stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| explain(s, "WatchRun"))?
        .into_inner();
    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Milestones go above the bars on a terminal, as plain lines otherwise (a log file).
    let plain = bars && multi.is_hidden();
    let say = |line: String| {
        if plain {
            println!("{line}");
        } else {
            multi.println(line).ok();
        }
    };
    let style = ProgressStyle::with_template("{prefix:>12} {bar:30} {pos}/{len} {msg}")
        .expect("valid template");
    let iteration_bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
    iteration_bar.set_prefix("iterations");
    let status_bar = multi.add(ProgressBar::new_spinner());
    status_bar.enable_steady_tick(Duration::from_millis(200));
    while let Some(event) = stream.message().await.map_err(|s| explain(s, "WatchRun"))? {
        use pb::run_event::Event;
        match event.event {
            Some(Event::Snapshot(run)) => {
                let total = run.hyperparameters.as_ref().and_then(|h| h.iterations).unwrap_or(0);
                iteration_bar.set_length(u64::from(total));
                let done = run
                    .iterations
                    .iter()
                    .filter(|i| i.iteration > 0 && i.status == pb::IterationStatus::Done as i32)
                    .count();
                iteration_bar.set_position(done as u64);
                status_bar.set_message(format!("{} ({})", run.name, status_name(run.status)));
            }
            Some(Event::Iteration(it)) => {
                times.saw(it.iteration, it.status);
                let s = iteration_status_name(it.status);
                status_bar.set_message(format!("iteration {}: {s} {}", it.iteration, it.error));
                if it.status == pb::IterationStatus::Done as i32 && it.iteration > 0 {
                    iteration_bar.inc(1);
                }
            }
            Some(Event::Step(s)) => status_bar.set_message(format!(
                "iteration {}: step {} loss {:.4} (supervised {:.4}, contrastive {:.4}, entropy {:.3}) {:.0} tok/s",
                s.iteration, s.step, s.loss, s.loss_supervised, s.loss_contrastive, s.entropy, s.tokens_per_second
            )),
            Some(Event::Checkpoint(v)) => {
                say(format!("checkpoint {} (iteration {})", v.version, v.iteration));
            }
            Some(Event::Swap(s)) => say(format!(
                "{} now serves {} (swap {:.0} ms)",
                s.generator, s.version, s.total_ms
            )),
            Some(Event::Eval(e)) => {
                if let Some(a) = e.accuracy {
                    say(format!(
                        "iteration {} {}: exact {:.1}%, extracted {:.1}% of {} (answers: {})",
                        e.iteration,
                        a.task,
                        100.0 * a.exact,
                        100.0 * a.extracted,
                        a.examples,
                        crate::report::answers(&e.predicted_counts)
                    ));
                }
            }
            Some(Event::RunStatus(s)) => status_bar.set_message(status_name(s)),
            None => {}
        }
    }
    status_bar.finish_and_clear();
    iteration_bar.finish_and_clear();
    let mut client = client.clone();
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| explain(s, "GetRun"))?
        .into_inner();
    Ok((run, times))
}
