/* chat NAME ROOM -- a fifobus chat client in C11 + POSIX.
 *
 * Build: cc -std=c11 -Wall -Wextra -O2 -o chat chat.c
 *
 * Joins topic chat.ROOM on the bus in $FIFOBUS_DIR, publishes every stdin line
 * as "NAME: line" and prints every message of the room (its own included).
 * On stdin EOF it waits for its own last messages (PING/PONG barrier), says
 * BYE and exits 0.  Demonstrates: a handshake that cannot hang when no broker
 * runs (O_NONBLOCK opens), read(2) on the FIFOs (no stdio read-ahead), and a
 * poll(2) loop over stdin and recv with a growable line buffer per fd.
 */
#define _GNU_SOURCE /* O_PATH */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Bytes read from one fd, split into lines. */
struct lines {
    int fd;
    char *buf;
    size_t start, len, cap; /* buf[start..len) not yet returned */
    int eof;
};

/* One read(2) into lb; returns -1 on error, else 0 (lb->eof set at EOF). */
static int fill(struct lines *lb) {
    if (lb->start) { /* drop the lines already returned */
        memmove(lb->buf, lb->buf + lb->start, lb->len - lb->start);
        lb->len -= lb->start;
        lb->start = 0;
    }
    if (lb->cap - lb->len < 4096) {
        lb->cap = lb->cap ? lb->cap * 2 : 65536;
        if (!(lb->buf = realloc(lb->buf, lb->cap))) die("chat: out of memory");
    }
    ssize_t n = read(lb->fd, lb->buf + lb->len, lb->cap - lb->len - 1); /* -1: NUL */
    if (n < 0) return errno == EINTR || errno == EAGAIN ? 0 : -1;
    if (n == 0) lb->eof = 1;
    lb->len += (size_t)n;
    return 0;
}

/* Next complete line (NUL-terminated, newline removed, *n = its length) or
 * NULL. At EOF a final unterminated line counts as complete. The line stays
 * valid until the next fill(). */
static char *next_line(struct lines *lb, size_t *n) {
    size_t avail = lb->len - lb->start;
    if (!avail) return NULL;
    char *p = lb->buf + lb->start, *nl = memchr(p, '\n', avail);
    if (!nl && !lb->eof) return NULL;
    *n = nl ? (size_t)(nl - p) : avail;
    lb->start += nl ? *n + 1 : *n;
    p[*n] = '\0';
    return p;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) die("* broker closed the connection"); /* EPIPE */
        p += w;
        n -= (size_t)w;
    }
}

static void send_str(int fd, const char *s) { write_all(fd, s, strlen(s)); }

/* The private directory holding the reply FIFO, removed even if we are
 * interrupted during the handshake. */
static char tmp[1024], reply[1100];

static void remove_tmp(void) {
    unlink(reply);
    rmdir(tmp);
}

static void on_signal(int sig) { /* async-signal-safe: clean up, die of sig */
    remove_tmp();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Exits unless st (of path) belongs to us or to root. */
static void check_owner(const char *path, const char *file, const struct stat *st) {
    uid_t me = geteuid();
    if (st->st_uid != me && st->st_uid != 0)
        die("chat: %s%s belongs to uid %ld, not to you (uid %ld) or root: "
            "not your broker; not sending HELLO",
            path, file, (long)st->st_uid, (long)me);
}

/* DIR/hello opened for writing, if DIR and hello belong to us or to root:
 * anyone can make a directory or a FIFO with these names and read what we
 * write. hello is opened relative to the checked directory, not through a
 * symbolic link, and the opened FIFO itself is checked again. */
static int open_hello(const char *dir) {
    struct stat st;
    int dfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC); /* search permission is enough */
    if (dfd < 0 || fstat(dfd, &st) < 0) die("chat: no broker is running on %s", dir);
    check_owner(dir, "", &st);
    if (fstatat(dfd, "hello", &st, AT_SYMLINK_NOFOLLOW) < 0)
        die("chat: no broker is running on %s", dir);
    check_owner(dir, "/hello", &st);
    if (!S_ISFIFO(st.st_mode)) die("chat: no broker is running on %s", dir);
    /* ENXIO: nobody reads it; ELOOP: it became a symbolic link */
    int hfd = openat(dfd, "hello", O_WRONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC);
    if (hfd < 0 || fstat(hfd, &st) < 0 || !S_ISFIFO(st.st_mode))
        die("chat: no broker is running on %s", dir);
    check_owner(dir, "/hello", &st);
    close(dfd);
    return hfd;
}

/* HELLO on DIR/hello; returns the client directory (malloc'd). */
static char *handshake(const char *dir, const char *name, const char *topic) {
    char hello[4096]; /* a HELLO must be shorter than PIPE_BUF */
    int hfd = open_hello(dir);
    const char *t = getenv("TMPDIR");
    snprintf(tmp, sizeof tmp, "%s/chat-XXXXXX", t && *t ? t : "/tmp");
    if (!mkdtemp(tmp)) die("chat: mkdtemp: %s", strerror(errno)); /* mode 0700 */
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    snprintf(reply, sizeof reply, "%s/reply", tmp);
    /* Open our end first (non-blocking) so the broker's reply never waits. */
    int rfd = mkfifo(reply, 0600) < 0 ? -1 : open(reply, O_RDONLY | O_NONBLOCK);
    if (rfd < 0) {
        remove_tmp();
        die("chat: %s: %s", reply, strerror(errno));
    }
    fcntl(hfd, F_SETFL, fcntl(hfd, F_GETFL) & ~O_NONBLOCK);
    int n = snprintf(hello, sizeof hello, "HELLO reply=%s name=%s pid=%ld sub=%s\n",
                     reply, name, (long)getpid(), topic);
    if (n < 0 || (size_t)n >= sizeof hello) {
        remove_tmp();
        die("chat: name or room too long");
    }
    write_all(hfd, hello, (size_t)n);
    close(hfd);

    struct lines ans = {.fd = rfd};
    struct pollfd pfd = {.fd = rfd, .events = POLLIN};
    size_t len;
    char *line;
    while (!(line = next_line(&ans, &len))) {
        if (ans.eof) break;
        if (poll(&pfd, 1, 10000) <= 0 || fill(&ans) < 0) break;
    }
    close(rfd);
    remove_tmp();
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    if (!line) die("chat: no answer from the broker on %s", dir);
    if (strncmp(line, "WELCOME ", 8) != 0) die("chat: %s", line); /* ERR ... */
    char *cdir = strchr(line + 8, ' '); /* WELCOME <uuid> <dir> */
    if (!cdir) die("chat: bad answer: %s", line);
    cdir = strdup(cdir + 1);
    free(ans.buf);
    return cdir;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: chat NAME ROOM\n");
        return 2;
    }
    const char *name = argv[1];
    char dir[4096], topic[512], path[4200];
    const char *env = getenv("FIFOBUS_DIR"), *xdg = getenv("XDG_RUNTIME_DIR");
    if (env && *env) snprintf(dir, sizeof dir, "%s", env); /* broker's rule */
    else if (xdg && *xdg) snprintf(dir, sizeof dir, "%s/fifobus", xdg);
    else if (geteuid() == 0) snprintf(dir, sizeof dir, "/run/fifobus");
    else snprintf(dir, sizeof dir, "/tmp/fifobus-%ld", (long)getuid());
    snprintf(topic, sizeof topic, "chat.%s", argv[2]);

    signal(SIGPIPE, SIG_IGN); /* a closed FIFO gives EPIPE, not death */
    char *cdir = handshake(dir, name, topic);
    snprintf(path, sizeof path, "%s/recv", cdir);
    int recv_fd = open(path, O_RDONLY);
    snprintf(path, sizeof path, "%s/send", cdir);
    int send_fd = open(path, O_WRONLY);
    if (recv_fd < 0 || send_fd < 0) die("chat: %s: %s", path, strerror(errno));
    printf("* joined %s as %s\n", topic, name);
    fflush(stdout);

    size_t plen = strlen(topic) + strlen(name) + 8;
    char *pub = malloc(plen);
    if (!pub) die("chat: out of memory");
    snprintf(pub, plen, "PUB %s %s: ", topic, name);

    struct lines in = {.fd = STDIN_FILENO}, inbox = {.fd = recv_fd};
    struct pollfd pfd[2] = {{.fd = STDIN_FILENO, .events = POLLIN},
                            {.fd = recv_fd, .events = POLLIN}};
    size_t len;
    char *line;
    int bye_sent = 0;
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            die("chat: poll: %s", strerror(errno));
        }
        if (pfd[0].revents) { /* stdin: each line becomes a PUB */
            if (fill(&in) < 0) in.eof = 1;
            while ((line = next_line(&in, &len))) {
                send_str(send_fd, pub);
                write_all(send_fd, line, len);
                send_str(send_fd, "\n");
            }
            if (in.eof) { /* flush our messages through the broker, then BYE */
                pfd[0].fd = -1;
                send_str(send_fd, "PING bye\n");
            }
        }
        if (pfd[1].revents) { /* recv: what the broker tells us */
            if (fill(&inbox) < 0) inbox.eof = 1;
            while ((line = next_line(&inbox, &len))) {
                if (strncmp(line, "MSG ", 4) == 0) {
                    char *p = memchr(line + 4, ' ', len - 4); /* after topic */
                    size_t off = p ? (size_t)(p + 1 - line) : len;
                    fwrite(line + off, 1, len - off, stdout);
                    putchar('\n');
                    fflush(stdout);
                } else if (strcmp(line, "PONG bye") == 0) {
                    send_str(send_fd, "BYE\n");
                    bye_sent = 1;
                } else if (strncmp(line, "DROPPED ", 8) == 0) {
                    fprintf(stderr, "* dropped %s messages\n", line + 8);
                } else if (strncmp(line, "ERR ", 4) == 0) {
                    fprintf(stderr, "%s\n", line);
                } else if (strcmp(line, "BYE") == 0) {
                    inbox.eof = 1;
                    break;
                }
            }
            if (inbox.eof) {
                if (!bye_sent) die("* broker closed the connection");
                free(in.buf), free(inbox.buf), free(pub), free(cdir);
                return 0;
            }
        }
    }
}
