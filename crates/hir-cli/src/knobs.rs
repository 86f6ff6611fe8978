//! `hir run`'s knob flags, derived from the one declaration of a run's knobs
//! (`hir_core::run::KNOBS`): each flag's name, help and default come from there, so a new
//! knob reaches the command line without an edit here.

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use hir_core::run::{RunConfig, KNOBS};
use hir_proto::pb;

/// The knobs given on the command line, as `(field, text)` in declaration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KnobArgs(pub Vec<(&'static str, String)>);

impl KnobArgs {
    /// Sets every given knob of `h`; the error names the first knob whose text does not
    /// parse.
    pub fn apply(&self, h: &mut pb::Hyperparameters) -> anyhow::Result<()> {
        for (name, value) in &self.0 {
            hir_proto::convert::set_hyperparameter(h, name, value)
                .map_err(|e| anyhow::anyhow!("--{}: {e}", flag_of(name)))?;
        }
        Ok(())
    }
}

fn flag_of(name: &str) -> &'static str {
    KNOBS
        .iter()
        .find(|k| k.name == name)
        .map_or("?", |k| k.flag)
}

/// Each knob's default, as JSON (the `paper` preset).
fn defaults() -> serde_json::Value {
    serde_json::to_value(RunConfig::default()).unwrap_or_default()
}

impl FromArgMatches for KnobArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let defaults = defaults();
        let mut given = Vec::new();
        for k in KNOBS {
            if k.switch {
                if m.get_flag(k.name) {
                    let default = defaults[k.name].as_bool().unwrap_or(false);
                    given.push((k.name, (!default).to_string()));
                }
            } else if let Some(v) = m.get_one::<String>(k.name) {
                given.push((k.name, v.clone()));
            }
        }
        Ok(Self(given))
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for KnobArgs {
    fn augment_args(cmd: Command) -> Command {
        let defaults = defaults();
        KNOBS.iter().fold(cmd, |cmd, k| {
            let text = k.help.split_whitespace().collect::<Vec<_>>().join(" ");
            let short = text
                .split(". ")
                .next()
                .unwrap_or(&text)
                .trim_end_matches('.');
            let arg = Arg::new(k.name).long(k.flag).long_help(text.clone());
            cmd.arg(if k.switch {
                arg.help(short.to_owned()).action(ArgAction::SetTrue)
            } else {
                arg.help(format!("{short} [{}]", defaults[k.name]))
                    .value_name("VALUE")
            })
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        knobs: KnobArgs,
    }

    #[test]
    fn every_knob_has_a_flag_and_switches_set_the_opposite_of_their_default() {
        let cli = Cli::try_parse_from([
            "hir",
            "--learning-rate",
            "2e-5",
            "--epochs",
            "3",
            "--no-replay",
            "--eos-after-cut",
        ])
        .unwrap();
        let mut h = pb::Hyperparameters::default();
        cli.knobs.apply(&mut h).unwrap();
        assert_eq!(h.learning_rate, Some(2e-5));
        assert_eq!(h.epochs_per_iteration, Some(3));
        assert_eq!(h.replay_buffer, Some(false));
        assert_eq!(h.eos_after_cut, Some(true));
        assert_eq!(h.batch_size, None);
        let help = Cli::command().render_long_help().to_string();
        for k in KNOBS {
            assert!(
                help.contains(&format!("--{}", k.flag)),
                "--{} missing",
                k.flag
            );
        }
    }

    #[test]
    fn a_value_that_does_not_parse_names_its_flag() {
        let cli = Cli::try_parse_from(["hir", "--batch-size", "many"]).unwrap();
        let err = cli
            .knobs
            .apply(&mut pb::Hyperparameters::default())
            .unwrap_err();
        assert!(err.to_string().contains("--batch-size"), "{err}");
    }
}
