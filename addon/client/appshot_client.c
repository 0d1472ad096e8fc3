/*
 * appshot-client: the command `appshot` when a resident engine runs.
 *
 * bin/appshot.js starts Node (~50 ms) before it can hand a command line to
 * the engine; this does the same hand-over in a few hundred microseconds:
 * it connects to the engine's socket, sends the request bin/appshot.js
 * would send (src/engine/protocol.ts, client.ts), relays the command's
 * output and exits with its code. Whatever it cannot hand over, or if no
 * engine answers, it runs bin/appshot.js with the same arguments, which
 * decides as it always did (and starts an engine where that is its rule):
 * the result of a command never depends on which of the two took it.
 *
 * Plain C.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

enum {
  FRAME_ACCEPTED = 0x41,
  FRAME_REFUSED = 0x52,
  FRAME_STDOUT = 0x4f,
  FRAME_STDERR = 0x45,
  FRAME_EXIT = 0x58,
};

static char **g_argv;

static int g_argc;

/* The package this program belongs to (build/Release/../..): 0, or -1. */
static int package_dir(char *dir, size_t size) {
  ssize_t n = readlink("/proc/self/exe", dir, size - 1);
  if (n <= 0) return -1;
  dir[n] = '\0';
  for (int up = 0; up < 3; up++) {
    char *slash = strrchr(dir, '/');
    if (!slash) return -1;
    *slash = '\0';
  }
  return 0;
}

/* node bin/appshot.js, beside this program in its package, with the same
 * arguments: the command runs as it would have without this client. */
static void run_in_node(void) {
  char self[PATH_MAX], script[PATH_MAX + 32];
  if (package_dir(self, sizeof self) == 0) {
    snprintf(script, sizeof script, "%s/bin/appshot.js", self);
    char **args = calloc((size_t)g_argc + 2, sizeof *args);
    if (args) {
      args[0] = "node";
      args[1] = script;
      for (int i = 1; i < g_argc; i++) args[i + 1] = g_argv[i];
      execvp("node", args);
    }
  }
  fprintf(stderr, "appshot: cannot run node bin/appshot.js: %s\n", strerror(errno));
  exit(70);
}

/* src/engine/protocol.ts buildId: the inode and modification time (ns) of
 * dist/engine/protocol.js in this package; "unknown" if it cannot be
 * read (as Node's client says then). */
static void build_id(char *id, size_t size) {
  char dir[PATH_MAX], file[PATH_MAX + 32];
  struct stat st;
  if (package_dir(dir, sizeof dir) == 0) {
    snprintf(file, sizeof file, "%s/dist/engine/protocol.js", dir);
    if (stat(file, &st) == 0) {
      snprintf(id, size, "%llu:%llu", (unsigned long long)st.st_ino,
               (unsigned long long)st.st_mtim.tv_sec * 1000000000ull + (unsigned long long)st.st_mtim.tv_nsec);
      return;
    }
  }
  snprintf(id, size, "unknown");
}

/* src/engine/client.ts servedByEngine: commands that need this process's
 * terminal, environment, stdin or signals, and command lines naming
 * standard input or output, run here. `serve` is handed over like any
 * command (hosted, it streams its log until Ctrl-C, which is passed on
 * below as for any command), but for `serve --foreground` and a serve
 * with a failure point or debug output aimed at this process (client.ts
 * SERVE_HERE). No engine running: Node starts one for it. */
static int served_by_engine(int argc, char **argv) {
  if (getenv("APPSHOT_TEST_KILL_AT")) return 0;
  const char *command = NULL;
  for (int i = 1; i < argc && !command; i++)
    if (argv[i][0] != '-') command = argv[i];
  static const char *const here[] = {"run", "exec", "wait", "check", "engine"};
  for (size_t i = 0; command && i < sizeof here / sizeof *here; i++)
    if (strcmp(command, here[i]) == 0) return 0;
  int serve = command && strcmp(command, "serve") == 0;
  if (serve && (getenv("APPSHOT_TEST_FAIL_AT") || getenv("APPSHOT_TEST_STOP_AT") || getenv("APPSHOT_DEBUG"))) return 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (serve && strcmp(a, "--foreground") == 0) return 0;
    if (command && strcmp(command, "logs") == 0) {
      if (strcmp(a, "--follow") == 0) return 0;
      if (a[0] == '-' && a[1] != '-') {
        const char *p = a + 1;
        while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')) {
          if (*p == 'f') return 0;
          p++;
        }
      }
    }
    if (strcmp(a, "-") == 0 || strncmp(a, "/dev/", 5) == 0 || strncmp(a, "/proc/self/", 11) == 0) return 0;
    /* --name=VALUE (or -name=VALUE) whose value is one of those. */
    if (a[0] == '-') {
      const char *p = a + 1 + (a[1] == '-');
      const char *name = p;
      while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '-') p++;
      if (p > name && *p == '=') {
        p++;
        if (*p == '-' || strncmp(p, "/dev/", 5) == 0 || strncmp(p, "/proc/self/", 11) == 0) return 0;
      }
    }
  }
  return 1;
}

/* src/home.ts defaultHome, then enginePaths().socket. */
static int engine_socket_path(char *out, size_t size) {
  const char *home = getenv("APPSHOT_HOME");
  char buf[PATH_MAX];
  if (!home || !*home) {
    if (getuid() == 0) {
      home = "/var/lib/appshot";
    } else {
      const char *state = getenv("XDG_STATE_HOME");
      if (state && *state) {
        snprintf(buf, sizeof buf, "%s/appshot", state);
      } else {
        const char *h = getenv("HOME");
        if (!h || !*h) {
          struct passwd *pw = getpwuid(getuid());
          h = pw ? pw->pw_dir : NULL;
        }
        if (!h) return -1;
        snprintf(buf, sizeof buf, "%s/.local/state/appshot", h);
      }
      home = buf;
    }
  }
  int n = snprintf(out, size, "%s/engine/engine.sock", home);
  return n > 0 && (size_t)n < size ? 0 : -1;
}

/* The request, a line of JSON, grown as needed. */
struct text {
  char *p;
  size_t len, cap;
};

static void put(struct text *t, const char *s, size_t n) {
  if (t->len + n + 1 > t->cap) {
    size_t cap = t->cap ? t->cap : 4096;
    while (t->len + n + 1 > cap) cap *= 2;
    char *p = realloc(t->p, cap);
    if (!p) {
      fprintf(stderr, "appshot: out of memory\n");
      exit(70);
    }
    t->p = p;
    t->cap = cap;
  }
  memcpy(t->p + t->len, s, n);
  t->len += n;
  t->p[t->len] = '\0';
}

static void puts_(struct text *t, const char *s) { put(t, s, strlen(s)); }

/* A JSON string. Bytes that are not ASCII go as they are: JSON is UTF-8,
 * as Node reads its arguments. */
static void put_string(struct text *t, const char *s) {
  put(t, "\"", 1);
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    char esc[8];
    if (*p == '"' || *p == '\\') {
      esc[0] = '\\';
      esc[1] = (char)*p;
      put(t, esc, 2);
    } else if (*p < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", *p);
      put(t, esc, 6);
    } else {
      put(t, (const char *)p, 1);
    }
  }
  put(t, "\"", 1);
}

static int ci_variable_set(const char *v) {
  return v && *v && strcmp(v, "0") != 0 && strcasecmp(v, "false") != 0;
}

static void build_request(struct text *t, int argc, char **argv) {
  puts_(t, "{\"kind\":\"command\",\"argv\":[");
  for (int i = 1; i < argc; i++) {
    if (i > 1) put(t, ",", 1);
    put_string(t, argv[i]);
  }
  puts_(t, "],\"cwd\":");
  char cwd[PATH_MAX];
  /* A directory gone (or a path too long): Node's client fails on it,
   * as the command run in Node will say; never "/" instead. */
  if (!getcwd(cwd, sizeof cwd)) run_in_node();
  put_string(t, cwd);
  puts_(t, ",\"env\":{");
  int first = 1;
  for (char **e = environ; *e; e++) {
    const char *eq = strchr(*e, '=');
    if (strncmp(*e, "APPSHOT_", 8) != 0 || !eq) continue;
    if (!first) put(t, ",", 1);
    first = 0;
    char name[256];
    size_t n = (size_t)(eq - *e) < sizeof name - 1 ? (size_t)(eq - *e) : sizeof name - 1;
    memcpy(name, *e, n);
    name[n] = '\0';
    put_string(t, name);
    put(t, ":", 1);
    put_string(t, eq + 1);
  }
  mode_t mask = umask(0);
  umask(mask);
  char num[64];
  snprintf(num, sizeof num, "},\"umask\":%u,\"tty\":{", (unsigned)mask);
  puts_(t, num);
  int out = isatty(1), err = isatty(2);
  snprintf(num, sizeof num, "\"stdout\":%s,\"stderr\":%s", out ? "true" : "false", err ? "true" : "false");
  puts_(t, num);
  struct winsize ws;
  if ((out && ioctl(1, TIOCGWINSZ, &ws) == 0 && ws.ws_col) || (err && ioctl(2, TIOCGWINSZ, &ws) == 0 && ws.ws_col)) {
    snprintf(num, sizeof num, ",\"columns\":%u", (unsigned)ws.ws_col);
    puts_(t, num);
  }
  puts_(t, ci_variable_set(getenv("CI")) ? "},\"ci\":true" : "},\"ci\":false");
  char build[64];
  build_id(build, sizeof build);
  puts_(t, ",\"build\":");
  put_string(t, build);
  const char *path = getenv("PATH");
  if (path) {
    puts_(t, ",\"path\":");
    put_string(t, path);
  }
  puts_(t, "}\n");
}

static volatile sig_atomic_t g_interrupts, g_last_signal;
static int g_told;
static sigset_t g_unblocked;

static void on_signal(int sig) {
  g_interrupts++;
  g_last_signal = sig;
}

/* Ctrl-C (or SIGTERM): the command's interruption, told once; a second
 * one leaves at once. */
static void heed_signals(int s) {
  if (g_interrupts <= g_told) return;
  if (g_told) _exit(g_last_signal == SIGINT ? 130 : 143);
  g_told = g_interrupts;
  send(s, "interrupt\n", 10, MSG_NOSIGNAL);
}

/* Waits until fd is ready for `events`, hearing signals meanwhile:
 * SIGINT and SIGTERM are blocked but while waiting here, so none is
 * missed between a check and a blocking call. */
static void wait_ready(int s, int fd, short events) {
  struct pollfd p = {.fd = fd, .events = events};
  for (;;) {
    heed_signals(s);
    int r = ppoll(&p, 1, NULL, &g_unblocked);
    if (r > 0) return;
    if (r < 0 && errno != EINTR) return;
  }
}

/* All of buf to fd (standard output or error), a pipe's atomic size at a
 * time once it has room, so that a reader that does not read never keeps
 * a Ctrl-C from being heard. */
static int write_out(int s, int fd, const unsigned char *p, size_t n) {
  while (n) {
    wait_ready(s, fd, POLLOUT);
    ssize_t w = write(fd, p, n < 4096 ? n : 4096);
    if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* The frame buffer, doubled until it holds `need` bytes. */
static void grow(unsigned char **buf, size_t *cap, size_t need) {
  while (*cap < need) {
    unsigned char *more = realloc(*buf, *cap * 2);
    if (!more) {
      fprintf(stderr, "appshot: out of memory\n");
      exit(70);
    }
    *buf = more;
    *cap *= 2;
  }
}

/* `appshot --version` (or -V) alone: package.json's version, as Node's
 * commander prints it, read here (about a millisecond, where even a warm
 * engine's answer is tens of them). 0, or -1 if it cannot be read: then
 * Node or the engine answers as ever. */
static int print_own_version(void) {
  char dir[PATH_MAX], file[PATH_MAX + 32], text[16384];
  if (package_dir(dir, sizeof dir) != 0) return -1;
  snprintf(file, sizeof file, "%s/package.json", dir);
  FILE *f = fopen(file, "r");
  if (!f) return -1;
  size_t n = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[n] = '\0';
  /* The top-level "version" key: the only one a package.json has (its
   * dependencies' versions are values). */
  const char *p = strstr(text, "\"version\"");
  if (!p) return -1;
  p += 9;
  while (*p == ' ' || *p == '\t') p++;
  if (*p++ != ':') return -1;
  while (*p == ' ' || *p == '\t') p++;
  if (*p++ != '"') return -1;
  const char *end = strchr(p, '"');
  if (!end || end == p || end - p > 64) return -1;
  printf("%.*s\n", (int)(end - p), p);
  return fflush(stdout) == 0 ? 0 : -1;
}

int main(int argc, char **argv) {
  g_argv = argv;
  g_argc = argc;
  if (argc == 2 && (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) && print_own_version() == 0) return 0;
  const char *mode = getenv("APPSHOT_ENGINE");
  if ((mode && strcmp(mode, "off") == 0) || !served_by_engine(argc, argv)) run_in_node();
  /* Node raises its soft descriptor limit to the hard one as it starts;
   * the engine serves only clients whose limits are its own (context.ts),
   * so this client does the same (and so does Node if it runs after). */
  struct rlimit nofile;
  if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
    nofile.rlim_cur = nofile.rlim_max;
    setrlimit(RLIMIT_NOFILE, &nofile);
  }
  struct sockaddr_un addr = {.sun_family = AF_UNIX};
  if (engine_socket_path(addr.sun_path, sizeof addr.sun_path) < 0) run_in_node();
  int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  /* None runs (ENOENT), or one died without removing its socket. */
  if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
    if (s >= 0) close(s);
    run_in_node();
  }
  /* Only an engine of this user's own: a socket at that name in a state
   * directory another user can change may be theirs, and would be told
   * this command's arguments, directory and environment, and answer for
   * it (fuzz35). Node then says what is wrong with the directory. */
  struct ucred peer;
  socklen_t peer_len = sizeof peer;
  if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &peer, &peer_len) != 0 || peer.uid != geteuid()) {
    close(s);
    run_in_node();
  }
  struct text req = {0};
  build_request(&req, argc, argv);
  /* An engine that closed on us (leaving, or a request too large for it)
   * did nothing: the command runs in Node. */
  for (size_t at = 0; at < req.len;) {
    ssize_t w = send(s, req.p + at, req.len - at, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      close(s);
      run_in_node();
    }
    at += (size_t)w;
  }
  free(req.p);

  /* A reader of our output that went away is not news: the command goes
   * on and its exit code is ours, what it still prints goes nowhere. */
  signal(SIGPIPE, SIG_IGN);
  sigset_t blocked;
  sigemptyset(&blocked);
  sigaddset(&blocked, SIGINT);
  sigaddset(&blocked, SIGTERM);
  sigprocmask(SIG_BLOCK, &blocked, &g_unblocked);
  sigdelset(&g_unblocked, SIGINT);
  sigdelset(&g_unblocked, SIGTERM);
  struct sigaction sa = {.sa_handler = on_signal};
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  int stdout_gone = 0, accepted = 0;
  /* Frames as they come; grown for one larger than it (a long listing). */
  size_t cap = 1 << 16, have = 0;
  unsigned char *buf = malloc(cap);
  if (!buf) run_in_node();
  for (;;) {
    if (have == cap) grow(&buf, &cap, cap + 1);
    wait_ready(s, s, POLLIN);
    ssize_t n = read(s, buf + have, cap - have);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n <= 0) {
      /* Before ACCEPTED the engine did nothing (it was leaving). */
      if (!accepted) {
        close(s);
        sigprocmask(SIG_SETMASK, &g_unblocked, NULL);
        run_in_node();
      }
      fprintf(stderr, "appshot: the engine went away during the command: its outcome is unknown (see appshot ps)\n");
      return 70;
    }
    have += (size_t)n;
    size_t at = 0;
    while (have - at >= 5) {
      uint32_t len = (uint32_t)buf[at + 1] << 24 | (uint32_t)buf[at + 2] << 16 | (uint32_t)buf[at + 3] << 8 | buf[at + 4];
      if (have - at - 5 < len) {
        /* Not all here: room for the whole of it once it is moved down. */
        grow(&buf, &cap, (size_t)len + 5);
        break;
      }
      unsigned char type = buf[at];
      const unsigned char *payload = buf + at + 5;
      switch (type) {
        case FRAME_ACCEPTED: accepted = 1; break;
        case FRAME_STDOUT:
          if (!stdout_gone && write_out(s, 1, payload, len) < 0) {
            if (errno != EPIPE) fprintf(stderr, "appshot: standard output: %s\n", strerror(errno));
            stdout_gone = 1;
          }
          break;
        case FRAME_STDERR: write_out(s, 2, payload, len); break;
        case FRAME_EXIT:
          if (len >= 4) return (int)((uint32_t)payload[0] << 24 | (uint32_t)payload[1] << 16 | (uint32_t)payload[2] << 8 | payload[3]);
          return 70;
        case FRAME_REFUSED:
          if (getenv("APPSHOT_DEBUG")) fprintf(stderr, "appshot: the engine refused (%.*s): running here\n", (int)len, (const char *)payload);
          close(s);
          sigprocmask(SIG_SETMASK, &g_unblocked, NULL);
          run_in_node();
      }
      at += 5 + len;
    }
    memmove(buf, buf + at, have - at);
    have -= at;
  }
}
