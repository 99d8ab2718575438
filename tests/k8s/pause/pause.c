/* The test node's pause image: the first process of every pod's sandbox, which holds its
 * namespaces. It sleeps until SIGTERM or SIGINT and reaps the children that end under it
 * (it is the PID 1 of a pod that shares its process namespace). Built static
 * (cc -static -O2), so its image holds this one file. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

static void reap(int signal_number) {
    (void)signal_number;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction ending = {.sa_handler = stop};
    struct sigaction reaping = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigemptyset(&ending.sa_mask);
    sigemptyset(&reaping.sa_mask);
    if (sigaction(SIGTERM, &ending, NULL) < 0 || sigaction(SIGINT, &ending, NULL) < 0 ||
        sigaction(SIGCHLD, &reaping, NULL) < 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}
