# Sourced by the experiment scripts: `train NAME CONFIG [FLAGS...]` trains into $root/NAME
# (log in $root/NAME.log, first run's seconds in $root/NAME.seconds) with $python.
# A finished run is not retrained (the trainer finds it complete), so a script can be
# rerun after a stop.
root=${root:-workdirs}
python=${PYTHON:-python}
train() {
  local start=$SECONDS
  "$python" -m vitjax.train --config "$2" --workdir "$root/$1" --no_progress "${@:3}" \
    > "$root/$1.log" 2>&1
  [ -e "$root/$1.seconds" ] || echo $((SECONDS - start)) > "$root/$1.seconds"
}
