/* Test-only LD_PRELOAD shim: records every connect()/sendto() target of every process (Python, Ray, gRPC)
   and refuses any that is not loopback. Python sockets go through libc too, so this one shim sees all. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int allowed(const struct sockaddr *sa, char *text, size_t n) {
    if (!sa) { snprintf(text, n, "null"); return 1; }
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &in->sin_addr, text, n);
        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &in6->sin6_addr, text, n);
        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) return 1;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) return in6->sin6_addr.s6_addr[12] == 127;
        return 0;
    }
    snprintf(text, n, "family-%d", sa->sa_family);
    return 1; /* AF_UNIX, AF_NETLINK: local by nature */
}

static int check(const char *call, const struct sockaddr *sa) {
    char text[INET6_ADDRSTRLEN + 16];
    int ok = allowed(sa, text, sizeof text);
    const char *log = getenv("FEDCAM_EGRESS_LOG");
    if (log && sa && (sa->sa_family == AF_INET || sa->sa_family == AF_INET6)) {
        FILE *f = fopen(log, "a");
        if (f) {
            fprintf(f, "{\"pid\": %d, \"call\": \"%s\", \"address\": \"%s\", \"allowed\": %s, \"native\": true}\n",
                    getpid(), call, text, ok ? "true" : "false");
            fclose(f);
        }
    }
    return ok;
}

int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "connect");
    if (!check("connect", sa)) { errno = ENETUNREACH; return -1; }
    return real(fd, sa, len);
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa, socklen_t len) {
    static ssize_t (*real)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "sendto");
    if (sa && !check("sendto", sa)) { errno = ENETUNREACH; return -1; }
    return real(fd, buf, n, flags, sa, len);
}
