from branchyard.cli import main

main()
