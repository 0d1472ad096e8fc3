/* An echo server that holds many connections (bench/tcp.js): one process,
 * epoll, every connection open until its client closes it.
 *   connapp PORT */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 2) return 2;
  struct rlimit nofile;
  getrlimit(RLIMIT_NOFILE, &nofile); /* thousands of connections */
  nofile.rlim_cur = nofile.rlim_max;
  setrlimit(RLIMIT_NOFILE, &nofile);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4096)) return perror("listen"), 1;
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = l};
  epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
  printf("LISTENING\n");
  fflush(stdout);
  char buf[65536];
  for (;;) {
    struct epoll_event got[64];
    int n = epoll_wait(ep, got, 64, -1);
    for (int i = 0; i < n; i++) {
      int fd = got[i].data.fd;
      if (fd == l) {
        int c = accept(l, NULL, NULL);
        if (c < 0) continue;
        struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
        continue;
      }
      ssize_t r = read(fd, buf, sizeof buf);
      if (r <= 0) {
        close(fd);
        continue;
      }
      if (write(fd, buf, (size_t)r) != r) close(fd);
    }
  }
}
