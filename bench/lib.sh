# Helpers shared by the bench scripts (sourced, not run).

# Seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# Median of the numbers on stdin, one per line.
median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

# tree_pipeline N: a pipeline of N trivial `cmd` stages on stdout; stage i
# writes out/i.txt from the output of stage i/2 (a binary tree).
tree_pipeline() {
  local n=$1 i p
  echo "stages:"
  echo "  s1:"
  echo "    cmd: echo 1 > out/1.txt"
  echo "    outs: [out/1.txt]"
  for i in $(seq 2 "$n"); do
    p=$((i / 2))
    echo "  s$i:"
    echo "    cmd: (cat out/$p.txt; echo $i) > out/$i.txt"
    echo "    deps: [out/$p.txt]"
    echo "    outs: [out/$i.txt]"
  done
}
