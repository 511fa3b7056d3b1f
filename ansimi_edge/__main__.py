from ansimi_edge.cli import main

main()
