"""branchyard: every commit of every branch runs, grouped into namespaces by branch name."""
