# Shared by the bench scripts (sourced after they cd to the repository root).

# wait_serving LOG PID: return once the server writing LOG says it serves;
# exit with its log when it dies first, or after 600 s.
wait_serving() {
  for _ in $(seq 1 600); do
    grep -q "serving cascade.v1" "$1" && return 0
    kill -0 "$2" 2>/dev/null || { cat "$1"; exit 1; }
    sleep 1
  done
  echo "server not serving after 600 s; its log: $1" >&2
  exit 1
}
