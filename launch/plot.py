"""Write the PNG plots of finished runs and print their paths.

  python -m launch.plot /tmp/lm_tiny              # a launch.train workdir
  python -m launch.plot /tmp/fed /tmp/sweep_h     # a launch.federate and a launch.sweep one

launch.train, launch.federate and launch.sweep already write them at the end of a run;
this redraws them (e.g. for a run from before plots existed). A directory that is not a
finished run of a known kind is one error line and exit status 2.
"""

from absl import app

from launch.common import exit_on_bad_input, parse_flags


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give one or more run directories: python -m launch.plot WORKDIR ...",
                         exitcode=2)
  from tapestry_jax import plots

  with exit_on_bad_input():
    kinds = [plots.run_kind(w) for w in workdirs]  # Every directory checked before any plot.
    for workdir, kind in zip(workdirs, kinds):
      for path in plots.plot_run(workdir):
        print(f"{kind}: {path}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
