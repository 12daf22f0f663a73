#!/bin/bash
# sample the summed RSS (MiB) of a command's process tree every 0.5 s; print the peak
"$@" & P=$!; PEAK=0
while kill -0 $P 2>/dev/null; do
  PIDS=$(pstree -p $P 2>/dev/null | grep -o '([0-9]*)' | tr -d '()' | tr '\n' ',' | sed 's/,$//')
  [ -n "$PIDS" ] && S=$(ps -o rss= -p $PIDS 2>/dev/null | awk '{s+=$1} END {print int(s/1024)}') && [ "${S:-0}" -gt $PEAK ] && PEAK=$S
  sleep 0.5
done
wait $P; echo "PEAK_TREE_RSS_MIB $PEAK"
