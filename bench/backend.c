/* The benchmark's plain-TCP application server, behind the mTLS-terminating nginx.
 *
 *   backend PORT
 *
 * One epoll loop on 127.0.0.1:PORT. The first byte of a connection picks the job:
 *   'E'            echo every later byte back until EOF;
 *   'D' + 8 bytes  (big-endian N) send N zero bytes, then wait for the client to close;
 *   'U' + 8 bytes  (big-endian N) read N bytes, then answer one byte 'K'.
 * Written in C so that the backend is never what a tunnel's figures measure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

enum { HEAD, ECHO, DOWN, UP, DONE };

struct conn {
    int fd;
    int state;
    unsigned char head[9];
    int head_len;
    uint64_t left;
    unsigned char *pending; /* echo bytes not yet written */
    size_t pending_len;
};

#define BUF (256 * 1024)
static unsigned char zeros[BUF];
static unsigned char buf[BUF];
static int ep;

static void drop(struct conn *c) {
    close(c->fd);
    free(c->pending);
    free(c);
}

static void want(struct conn *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Returns 0 to keep the connection, -1 to drop it. */
static int pump_down(struct conn *c) {
    while (c->left > 0) {
        size_t n = c->left < BUF ? (size_t)c->left : BUF;
        ssize_t w = send(c->fd, zeros, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) {
                want(c, EPOLLOUT | EPOLLIN);
                return 0;
            }
            return -1;
        }
        c->left -= (uint64_t)w;
    }
    c->state = DONE;
    want(c, EPOLLIN);
    return 0;
}

static int flush_echo(struct conn *c) {
    while (c->pending_len > 0) {
        ssize_t w = send(c->fd, c->pending, c->pending_len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) {
                want(c, EPOLLOUT);
                return 0;
            }
            return -1;
        }
        memmove(c->pending, c->pending + w, c->pending_len - (size_t)w);
        c->pending_len -= (size_t)w;
    }
    want(c, EPOLLIN);
    return 0;
}

static int on_data(struct conn *c, unsigned char *p, size_t n) {
    while (n > 0) {
        if (c->state == HEAD) {
            c->head[c->head_len++] = *p++;
            n--;
            if (c->head[0] == 'E') {
                c->state = ECHO;
            } else if (c->head_len == 9) {
                uint64_t v = 0;
                for (int i = 1; i < 9; i++) v = (v << 8) | c->head[i];
                c->left = v;
                if (c->head[0] == 'D') {
                    c->state = DOWN;
                    return pump_down(c);
                }
                if (c->head[0] != 'U') return -1;
                c->state = UP;
            }
        } else if (c->state == ECHO) {
            c->pending = realloc(c->pending, c->pending_len + n);
            memcpy(c->pending + c->pending_len, p, n);
            c->pending_len += n;
            return flush_echo(c);
        } else if (c->state == UP) {
            size_t take = n < c->left ? n : (size_t)c->left;
            c->left -= take;
            p += take;
            n -= take;
            if (c->left == 0) {
                c->state = DONE;
                if (send(c->fd, "K", 1, MSG_NOSIGNAL) != 1) return -1;
            }
        } else {
            return 0; /* DOWN or DONE: ignore stray bytes */
        }
    }
    if (c->state == UP && c->left == 0) {
        c->state = DONE;
        if (send(c->fd, "K", 1, MSG_NOSIGNAL) != 1) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: backend PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("backend: bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    struct epoll_event events[256];
    for (;;) {
        int k = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < k; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct conn *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                }
                continue;
            }
            int rc = 0;
            if (events[i].events & EPOLLOUT) {
                rc = c->state == DOWN ? pump_down(c) : flush_echo(c);
            }
            if (rc == 0 && (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && c->pending_len == 0) {
                ssize_t r = recv(c->fd, buf, BUF, 0);
                if (r == 0 || (r < 0 && errno != EAGAIN)) {
                    rc = -1;
                } else if (r > 0) {
                    rc = on_data(c, buf, (size_t)r);
                }
            }
            if (rc < 0) drop(c);
        }
    }
}
